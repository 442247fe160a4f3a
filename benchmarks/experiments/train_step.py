"""Training-step time: full fine-tuning, the lower bound, HF PEFT and peftkit LoRA/DoRA (dropout 0 and 0.05).

A step is the forward and backward pass of the causal-LM loss on the reference batch (the optimizer update of
the adapter, a few hundred thousand numbers, is left out: the lower bound has nothing to update). All variants
live in one process and are timed round-robin, so load on the machine spreads over them alike.
"""

from __future__ import annotations

from typing import Any

from common import TRAIN_VARIANTS, Shape, Unavailable, make_variant, median, round_robin, step_fn

#: (variant, reference, target ratio or None, what HF PEFT measured when the issue was filed)
TARGETS = [
    ("pk_lora_0", "lower_bound", 1.08), ("hf_lora_0", "lower_bound", None),
    ("pk_lora_0.05", "lower_bound", 1.15), ("hf_lora_0.05", "lower_bound", None),
    ("pk_dora_0", "lower_bound", 1.15), ("hf_dora_0", "lower_bound", None),
    ("pk_dora_0.05", "lower_bound", 1.25), ("hf_dora_0.05", "lower_bound", None),
    ("full", "lower_bound", None),
]


def run(shape: Shape, rounds: int, variants: list[str] | None = None, deadline: float | None = None) -> dict[str, Any]:
    """Time every training variant; returns raw times, medians and ratios to the lower bound.

    No new round starts after ``deadline`` (``time.perf_counter()``), so a loaded machine shortens the run.
    """
    names = variants or TRAIN_VARIANTS
    fns, skipped = {}, {}
    for name in names:
        try:
            fns[name] = step_fn(name, make_variant(name, shape, share=True), shape)
        except Unavailable as exc:
            skipped[name] = str(exc)
    times = round_robin(fns, rounds=rounds, warmup=1, deadline=deadline)
    medians = {k: median(v) for k, v in times.items()}
    rows = []
    for name, ref, target in TARGETS:
        if name in medians and ref in medians:
            value = medians[name] / medians[ref]
            rows.append({"metric": f"train step {name} / {ref}", "ratio": value, "target": target,
                         "met": None if target is None else value <= target})
    for name in ("pk_lora_0", "pk_lora_0.05", "pk_dora_0", "pk_dora_0.05"):
        hf = "hf" + name[2:]
        if name in medians and hf in medians:
            rows.append({"metric": f"train step {name} / {hf}", "ratio": medians[name] / medians[hf],
                         "target": None, "met": None})
    return {"times_s": times, "median_s": medians, "ratios": rows, "skipped": skipped}
