"""Unmerged inference: prefill of the reference batch and one-token decode, LoRA and DoRA against the base model.

Adapters are unmerged (the forward adds the update), in evaluation mode, without gradients. Decode appends one
token per sequence to the key/value cache of the prefill and is timed ``DECODE_REPEAT`` times per round (the
cache is cropped back after each), because a single decode step is short.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from common import Shape, Unavailable, batch, make_variant, median

VARIANTS = ["base", "hf_lora_0", "pk_lora_0", "hf_dora_0", "pk_dora_0"]
DECODE_REPEAT = 8
TARGETS = {"pk_lora_0": 1.1, "pk_dora_0": 1.2}


def _prefill_and_decode(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        decode = []
        for _ in range(DECODE_REPEAT):
            start = time.perf_counter()
            model(input_ids=nxt, cache=cache, use_cache=True)
            decode.append(time.perf_counter() - start)
            cache.crop(-1)  # drop the decoded token again
    return prefill, median(decode)


def run(shape: Shape, rounds: int) -> dict[str, Any]:
    """Prefill and decode times per variant, round-robin; ratios of medians to the base model."""
    ids = batch(shape)
    models, skipped = {}, {}
    for name in VARIANTS:
        try:
            models[name] = make_variant(name, shape).eval()
        except Unavailable as exc:
            skipped[name] = str(exc)
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            prefill, decode = _prefill_and_decode(model, ids)
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
