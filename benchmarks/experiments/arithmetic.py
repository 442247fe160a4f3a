"""The arithmetic a LoRA training step cannot avoid, against the lower bound's: a floor under the step-time ratio.

Each adapted projection (in → out, rank r, T tokens) adds six products r wide, two forward and four backward:
``h = xAᵀ`` and ``hBᵀ``; ``∂B = gᵀh``, ``gB``, ``∂A = (gB)ᵀx`` and ``(gB)A``, each ``T·r·in`` or ``T·r·out``
multiply-adds, so ``6·T·r·(in + out)`` floating-point operations per projection and step. The lower bound's
operations are counted by running one step under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products
and attention; elementwise work is not counted, on either side). HF PEFT's LoRA step, whose autograd graph runs
every product out of place, is counted the same way as a check of the formula.

If the rank-r products ran exactly as fast per operation as the model's own 512- and 1408-wide ones, and the
adapters cost nothing else, the step would take ``(lower bound + rank-r) / lower bound`` times the lower bound:
the ratio no implementation of this update can beat on this shape. The issue's 1.08 target for LoRA at dropout 0
is to be read against it::

    .venv/bin/python benchmarks/experiments/arithmetic.py [--quick] [--out results/arithmetic.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import FULL, QUICK, RANK, TARGETS, Shape, environment, make_variant, report, setup_torch, step_fn  # noqa: E402


def step_flops(name: str, shape: Shape) -> int:
    """Floating-point operations of one training step of variant ``name``, as ``FlopCounterMode`` counts them."""
    run = step_fn(name, make_variant(name, shape), shape)
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def rank_r_flops(model: nn.Module, shape: Shape, rank: int = RANK) -> int:
    """``6·T·r·(in + out)`` summed over the model's projections named in ``TARGETS``."""
    tokens = shape.batch * shape.seq
    total = 0
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Linear) and qualified.rsplit(".", 1)[-1] in TARGETS:
            total += 6 * tokens * rank * (module.in_features + module.out_features)
    return total


def run(shape: Shape) -> dict[str, Any]:
    """The lower bound's counted operations, the rank-r products' and the floor ratio; HF PEFT's count as a check."""
    lower = step_flops("lower_bound", shape)
    extra = rank_r_flops(make_variant("base", shape), shape)
    floor = (lower + extra) / lower
    result: dict[str, Any] = {"flops": {"lower_bound": lower, "rank_r_products": extra}, "ratios": [
        {"metric": "arithmetic floor LoRA / lower_bound", "ratio": floor, "target": None, "met": None}]}
    try:
        hf = step_flops("hf_lora_0", shape)
    except ImportError as exc:  # peft not installed: the floor stands on the formula alone
        result["skipped"] = {"hf_lora_0": str(exc)}
    else:
        result["flops"]["hf_lora_0"] = hf
        result["ratios"].append({"metric": "counted arithmetic hf_lora_0 / lower_bound", "ratio": hf / lower,
                                 "target": None, "met": None})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model for a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    setup_torch()
    shape = QUICK if args.quick else FULL
    result = run(shape)
    result.update(shape=shape.__dict__, environment=environment())
    report({}, {row["metric"]: row["ratio"] for row in result["ratios"]}, result, args.out)


if __name__ == "__main__":
    main()
