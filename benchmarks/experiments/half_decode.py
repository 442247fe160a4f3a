"""One-token decoding of a bf16 model with fp32 adapters (HF PEFT's default there): the base model, HF PEFT and
peftkit LoRA, round-robin in one process, ratios of medians.

Decoding one token is bound by per-layer overhead, not arithmetic; this is where a GPU spends it too. The reference
Llama of the other experiments in bf16, batch 4, decoding into a static cache after a 256-token prefill.
``python benchmarks/experiments/half_decode.py [--quick] [--rounds N] [--out results.json]``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import (
    FULL,
    QUICK,
    Shape,
    batch,
    build_model,
    environment,
    hf_adapt,
    median,
    pk_adapt,
    randomize_adapter,
    report,
    timing_args,
)
from torch import nn

VARIANTS = ["base", "hf_lora_0", "pk_lora_0"]
TOKENS = 8


def variant(name: str, shape: Shape) -> nn.Module:
    """The bf16 reference model, adapted after the cast (so its adapters are fp32, as both libraries make them)."""
    model = build_model(shape, share=True).to(torch.bfloat16)
    if name != "base":
        model = (hf_adapt if name.startswith("hf") else pk_adapt)(model, False, 0.0)
        randomize_adapter(model)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}, name
    return model.eval()


def run(shape: Shape, rounds: int) -> dict[str, Any]:
    from transformers import StaticCache

    ids = batch(shape)
    models = {name: variant(name, shape) for name in VARIANTS}
    caches = {n: StaticCache(config=m.config, max_cache_len=shape.seq + TOKENS) for n, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            for name, model in models.items():
                caches[name].reset()
                nxt = model(input_ids=ids, cache=caches[name], use_cache=True).logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(TOKENS):
                    nxt = model(input_ids=nxt, cache=caches[name], use_cache=True).logits[:, -1:].argmax(-1)
                if r:
                    times[name].append((time.perf_counter() - start) / TOKENS)
    medians = {k: median(v) for k, v in times.items()}
    return {"times_s": times, "median_s": medians,
            "ratios": {"decode hf_lora_0 / base": medians["hf_lora_0"] / medians["base"],
                       "decode pk_lora_0 / base": medians["pk_lora_0"] / medians["base"],
                       "decode pk_lora_0 / hf_lora_0": medians["pk_lora_0"] / medians["hf_lora_0"]}}


def main() -> None:
    args = timing_args(__doc__, rounds=15)
    shape = QUICK if args.quick else FULL
    result = {"environment": environment(), "shape": shape.__dict__, **run(shape, args.rounds)}
    report(result["median_s"], result["ratios"], result, args.out)


if __name__ == "__main__":
    main()
