"""Merge, save and load times of a LoRA adapter on the reference model: peftkit against HF PEFT."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import Shape, make_variant, median, round_robin


def _pk_ops(shape: Shape, tmp: Path) -> dict[str, Any]:
    import peftkit as pk

    model = make_variant("pk_lora_0", shape).eval()
    path = tmp / "pk"
    pk.save_adapter(model, path)

    def merge() -> None:
        with torch.no_grad():
            pk.merge(model)
            pk.unmerge(model)

    def load() -> None:
        pk.load_adapter(model, path, name="other")
        pk.delete_adapter(model, "other")

    return {"merge+unmerge": merge, "save": lambda: pk.save_adapter(model, path), "load": load}


def _hf_ops(shape: Shape, tmp: Path) -> dict[str, Any]:
    model = make_variant("hf_lora_0", shape).eval()
    path = tmp / "hf"
    model.save_pretrained(path)

    def merge() -> None:
        model.merge_adapter()
        model.unmerge_adapter()

    def load() -> None:
        model.load_adapter(path, adapter_name="other")
        model.delete_adapter("other")

    return {"merge+unmerge": merge, "save": lambda: model.save_pretrained(path), "load": load}


def run(shape: Shape, rounds: int) -> dict[str, Any]:
    """Median times of merge+unmerge, save and load (into a model that already has an adapter), per library."""
    with tempfile.TemporaryDirectory() as tmp:
        ops = {f"pk {k}": v for k, v in _pk_ops(shape, Path(tmp)).items()}
        ops |= {f"hf {k}": v for k, v in _hf_ops(shape, Path(tmp)).items()}
        times = round_robin(ops, rounds=rounds, warmup=1)
    medians = {k: median(v) for k, v in times.items()}
    rows = [{"metric": f"{op} pk / hf", "ratio": medians[f"pk {op}"] / medians[f"hf {op}"], "target": None,
             "met": None} for op in ("merge+unmerge", "save", "load")]
    return {"times_s": times, "median_s": medians, "ratios": rows}
