"""Performant LoRA on q, k, v (one shared A, one dropout mask) vs three separate adapters vs HF PEFT.

One training step (forward + backward of the causal-LM loss) on the reference Llama of ``common.py``, LoRA rank 16,
alpha 32, dropout 0.05 on q_proj, k_proj and v_proj, all variants timed interleaved in the same run; the figures
are ratios of medians. Variants:

* ``pk_performant``: ``pk.LoRA(target_modules=["linear_qkv"])`` (one A and one dropout per block);
* ``pk_separate``: ``pk.LoRA(target_modules=["q_proj", "k_proj", "v_proj"])`` (three adapters);
* ``hf_separate``: HF PEFT's ``LoraConfig`` on the same three modules;
* ``base``: the frozen model, no adapter (the lower bound).

Prints and writes JSON (medians, ratios, environment, git revision)::

    .venv/bin/python benchmarks/experiments/performant_qkv.py [--quick] [--out benchmarks/results/performant_qkv.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    ALPHA,
    FULL,
    QUICK,
    RANK,
    Shape,
    build_model,
    environment,
    median,
    report,
    round_robin,
    step_fn,
    timing_args,
)

QKV = ["q_proj", "k_proj", "v_proj"]
DROPOUT = 0.05


def make(name: str, shape: Shape) -> nn.Module:
    import peftkit as pk

    model = build_model(shape)
    if name == "base":
        return model.requires_grad_(False).train()
    if name == "hf_separate":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=QKV))
    else:
        targets = ["linear_qkv"] if name == "pk_performant" else QKV
        pk.apply(model, pk.LoRA(target_modules=targets, rank=RANK, alpha=ALPHA, dropout=DROPOUT))
    return model.train()


def main() -> None:
    args = timing_args(__doc__, rounds=9)
    shape = QUICK if args.quick else FULL
    names = ["base", "pk_performant", "pk_separate", "hf_separate"]
    fns = {name: step_fn("adapter", make(name, shape), shape) for name in names}
    times = round_robin(fns, rounds=args.rounds, warmup=2)
    medians = {k: median(v) for k, v in times.items()}
    ratios = {
        "pk_performant / pk_separate": medians["pk_performant"] / medians["pk_separate"],
        "pk_performant / hf_separate": medians["pk_performant"] / medians["hf_separate"],
        "pk_separate / hf_separate": medians["pk_separate"] / medians["hf_separate"],
        "pk_performant overhead over base": (medians["pk_performant"] - medians["base"]) / medians["base"],
        "hf_separate overhead over base": (medians["hf_separate"] - medians["base"]) / medians["base"],
    }
    result = {
        "experiment": "performant_qkv",
        "shape": shape.__dict__, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "rounds": args.rounds,
        "median_step_s": medians, "ratios": ratios, "times_s": times,
        "environment": environment(),
    }
    report(medians, result["ratios"], result, args.out)


if __name__ == "__main__":
    main()
