"""How a LoRA training step's cost over the lower bound depends on the rank: peftkit and HF PEFT at ranks 1, 4, 16.

The reference model and batch of ``run.py`` (Llama, hidden 512, 8 layers, batch 4 × 256, fp32, 2 threads), LoRA on
all seven projections with alpha = 2 · rank and dropout 0, timed interleaved with the lower bound (the frozen model
with a backward pass to its input). If the adapters' cost were their arithmetic, it would grow sixteenfold from
rank 1 to rank 16; what stays at rank 1 is the cost of streaming each projection's input, output and gradients
through products only r wide, and of the per-projection work around them::

    .venv/bin/python benchmarks/experiments/rank_overhead.py [--quick] [--rounds 9] [--out results/rank_overhead.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    FULL,
    QUICK,
    TARGETS,
    Shape,
    build_model,
    environment,
    median,
    randomize_adapter,
    report,
    round_robin,
    step_fn,
    timing_args,
)

RANKS = (1, 4, 16)


def adapted(lib: str, rank: int, shape: Shape) -> nn.Module:
    """The reference model with LoRA of ``rank`` (alpha 2·rank) on all seven projections, from ``lib``."""
    model = build_model(shape, share=True)
    if lib == "hf":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    else:
        import peftkit as pk

        pk.apply(model, pk.LoRA(target_modules=TARGETS, rank=rank, alpha=2 * rank))
    randomize_adapter(model)
    return model.train()


def main() -> None:
    args = timing_args(__doc__, rounds=9)
    shape = QUICK if args.quick else FULL
    fns = {"lower_bound": step_fn("lower_bound", build_model(shape, share=True).requires_grad_(False).train(), shape)}
    for lib in ("pk", "hf"):
        for rank in RANKS:
            fns[f"{lib} r{rank}"] = step_fn("pk_lora_0", adapted(lib, rank, shape), shape)
    times = round_robin(fns, rounds=args.rounds, warmup=2)
    medians = {k: median(v) for k, v in times.items()}
    ratios = {f"{k} / lower_bound": v / medians["lower_bound"] for k, v in medians.items() if k != "lower_bound"}
    result = {
        "experiment": "rank_overhead", "shape": vars(shape), "ranks": list(RANKS), "rounds": args.rounds,
        "median_s": medians, "ratios": ratios, "times_s": times, "environment": environment(),
    }
    report(medians, ratios, result, args.out)


if __name__ == "__main__":
    main()
