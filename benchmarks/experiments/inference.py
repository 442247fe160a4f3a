"""Unmerged inference: prefill of the reference batch and one-token decode, LoRA and DoRA against the base model.

Adapters are unmerged (the forward adds the update), in evaluation mode, without gradients. Each model decodes
into its own preallocated key/value cache (``transformers.StaticCache``, reset before each prefill): a growing
``DynamicCache`` reallocates and copies its tensors every step, and how long that takes depends on where the
allocator puts them (it varied by 2× between identical models), which swamped the adapters' own cost. Decode
is timed for ``DECODE_REPEAT`` consecutive tokens per round (a single step is short) and the median taken.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import Shape, Unavailable, batch, make_variant, median

VARIANTS = ["base", "hf_lora_0", "pk_lora_0", "hf_dora_0", "pk_dora_0"]
DECODE_REPEAT = 8
TARGETS = {"pk_lora_0": 1.1, "pk_dora_0": 1.2}


def _static_cache(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=ids.shape[1] + DECODE_REPEAT)


def _prefill_and_decode(model: torch.nn.Module, ids: torch.Tensor, cache: Any) -> tuple[float, float]:
    cache.reset()
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        prefill = time.perf_counter() - start
        nxt = out.logits[:, -1:].argmax(-1)
        decode = []
        for _ in range(DECODE_REPEAT):
            start = time.perf_counter()
            model(input_ids=nxt, cache=cache, use_cache=True)
            decode.append(time.perf_counter() - start)
    return prefill, median(decode)


def run(shape: Shape, rounds: int) -> dict[str, Any]:
    """Prefill and decode times per variant, round-robin; ratios of medians to the base model."""
    ids = batch(shape)
    models, skipped = {}, {}
    for name in VARIANTS:
        try:
            models[name] = make_variant(name, shape, share=True).eval()
        except Unavailable as exc:
            skipped[name] = str(exc)
    caches = {name: _static_cache(model, ids) for name, model in models.items()}
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            prefill, decode = _prefill_and_decode(model, ids, caches[name])
            if r:
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    medians = {k: {p: median(v) for p, v in t.items()} for k, t in times.items()}
    rows = []
    for name in models:
        if name == "base":
            continue
        for phase in ("prefill", "decode"):
            value = medians[name][phase] / medians["base"][phase]
            target = TARGETS.get(name) if phase == "decode" else None
            rows.append({"metric": f"inference {phase} {name} / base", "ratio": value, "target": target,
                         "met": None if target is None else value <= target})
    return {"times_s": times, "median_s": medians, "ratios": rows, "skipped": skipped}
