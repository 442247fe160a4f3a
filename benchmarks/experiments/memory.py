"""Memory of one training step, one fresh process per variant.

Two figures per variant: the **activation memory saved for backward** (the unique storages autograd keeps,
seen through ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, a tensor several nodes save
counted once), and the step's **peak resident memory** above what the process held before it (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``; ``None`` elsewhere).

Run alone: ``python benchmarks/experiments/memory.py VARIANT [--quick]`` prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from common import FULL, QUICK, Shape, Unavailable, make_variant, setup_torch, step_fn

from peftkit.train.metrics import process_memory

VARIANTS = ["lower_bound", "hf_lora_0", "hf_lora_0.05", "pk_lora_0", "pk_lora_0.05",
            "hf_dora_0", "hf_dora_0.05", "pk_dora_0", "pk_dora_0.05"]


def saved_bytes(model: torch.nn.Module, step: Any) -> int:
    """Bytes of the unique non-parameter storages saved for backward during ``step()``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_rss_delta(step: Any) -> int | None:
    """Peak resident bytes during ``step()`` above the resident bytes before it (Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = process_memory("VmRSS")
    step()
    peak = process_memory("VmHWM")
    return None if before is None or peak is None else peak - before


def measure(name: str, shape: Shape) -> dict[str, Any]:
    setup_torch()
    try:
        model = make_variant(name, shape)
    except Unavailable as exc:
        return {"variant": name, "skipped": str(exc)}
    step = step_fn(name, model, shape)
    step()  # warm-up: allocator pools, lazy initialisation
    return {"variant": name, "saved_bytes": saved_bytes(model, step), "peak_rss_delta_bytes": peak_rss_delta(step)}


# Large blocks straight from mmap, returned on free, so the resident peak of one step is visible (glibc).
_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run(shape: Shape, quick: bool, variants: list[str] | None = None) -> dict[str, Any]:
    """One subprocess per variant; ratios of saved activation memory."""
    def one(name: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, name] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_ENV)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else {"variant": name, "error": proc.stderr[-2000:]}

    # Two processes at a time: both figures are per process, so sharing the CPU changes neither.
    with ThreadPoolExecutor(max_workers=2) as pool:
        names = variants or VARIANTS
        results: dict[str, dict[str, Any]] = dict(zip(names, pool.map(one, names), strict=True))
    saved = {k: v["saved_bytes"] for k, v in results.items() if "saved_bytes" in v}
    rows = []

    def add(metric: str, a: str, b: str, target: float | None) -> None:
        if a in saved and b in saved:
            value = saved[a] / saved[b]
            rows.append({"metric": metric, "ratio": value, "target": target,
                         "met": None if target is None else value <= target})

    add("saved activations pk_lora_0 / hf_lora_0", "pk_lora_0", "hf_lora_0", 1.0)
    add("saved activations pk_lora_0.05 / hf_lora_0.05", "pk_lora_0.05", "hf_lora_0.05", 1.0)
    add("saved activations pk_lora_0.05 / pk_lora_0", "pk_lora_0.05", "pk_lora_0", 1.2)
    add("saved activations hf_lora_0.05 / hf_lora_0", "hf_lora_0.05", "hf_lora_0", None)
    add("saved activations pk_dora_0 / hf_dora_0", "pk_dora_0", "hf_dora_0", None)
    add("saved activations pk_dora_0.05 / hf_dora_0.05", "pk_dora_0.05", "hf_dora_0.05", None)
    add("saved activations pk_lora_0 / lower_bound", "pk_lora_0", "lower_bound", None)
    return {"per_variant": results, "ratios": rows}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], QUICK if "--quick" in sys.argv else FULL)))
