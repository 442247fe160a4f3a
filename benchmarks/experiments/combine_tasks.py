"""Two tasks, two LoRA (or DoRA) adapters, every ``pk.combine`` method: each combination's loss on both tasks.

    .venv/bin/python benchmarks/experiments/combine_tasks.py [--method lora|dora|both] [--steps 300] \
        [--json benchmarks/results/combine_tasks.json]

A small MLP (32 → 64 → 64 → 8, random "pretrained" weights) is the base. Task A and task B are
regression onto teachers = the base with a random rank-4 change to its first layer; task A's inputs
live on the first 16 input dimensions and its change reads only those, task B's on the last 16. So
ΔW_A + ΔW_B solves both tasks at once, and what each adapter learns outside its own half (there is
no signal there) is the interference a combination method has to cope with. One
rank-8 adapter is trained per task; then every combination method mixes them with weights
1.0 / 1.0 (task arithmetic adds task vectors), density 0.5 where used. ``--method`` picks the adapter
type: LoRA, DoRA (same tasks, seeds and optimiser; a fresh base model, since one layer cannot hold both
kinds) or both. For DoRA, combine mixes the direction updates as it mixes LoRA updates and the magnitudes
as offsets from the base row norms (see :mod:`peftkit.merge.combine`); a method combine refuses for an
adapter type is reported as a row saying why, not left out. The table reports the mean squared error on
held-out inputs of each task (lower is better; the base model's error is the scale).
Runs in a few seconds on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError
from peftkit.merge.combine import COMBINATION_METHODS, combine

LAYERS = ["0", "2", "4"]
ADAPTERS: dict[str, type[pk.LoRA]] = {"lora": pk.LoRA, "dora": pk.DoRA}


def base_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


HALVES = {"A": slice(0, 16), "B": slice(16, 32)}


def teacher(task: str, seed: int) -> nn.Sequential:
    model = base_model()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        change = torch.zeros_like(model[0].weight)
        change[:, HALVES[task]] = torch.randn(64, 4, generator=g) @ torch.randn(4, 16, generator=g) / 4
        model[0].weight += change
    return model


def data(task: str, seed: int, n: int) -> torch.Tensor:
    x = torch.zeros(n, 32)
    x[:, HALVES[task]] = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return x


def loss(model: nn.Module, task: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), task(x)))


def train_adapter(model: nn.Module, kind: str, name: str, task: nn.Module, steps: int, seed: int) -> None:
    """Train a ``kind`` adapter ``name`` (rank 8, all three layers) on task ``name`` with Adam."""
    torch.manual_seed(seed)
    pk.apply(model, ADAPTERS[kind](target_modules=LAYERS, rank=8, alpha=16), name=name, activate=True)
    pk.set_adapter(model, name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        x = data(name, 1000 * seed + step, 128)
        with torch.no_grad():
            target = task(x)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def run(steps: int, kind: str) -> list[dict[str, object]]:
    """Rows for adapter type ``kind``: the base, each adapter alone, then every combination method."""
    tasks = {"A": teacher("A", 1), "B": teacher("B", 2)}
    held_out = {t: data(t, 10**6 + i, 2048) for i, t in enumerate(tasks)}
    model = base_model()
    rows: list[dict[str, object]] = []

    def row(label: str, note: str | None = None) -> None:
        losses = {f"loss_{t}": None if note else loss(model, tasks[t], held_out[t]) for t in tasks}
        rows.append({"adapter": kind, "method": label, **losses, **({"note": note} if note else {})})

    for i, (name, task) in enumerate(tasks.items(), start=1):
        train_adapter(model, kind, name, task, steps, seed=i)
    with pk.disable_adapters(model):
        row("base (no adapter)")
    for name in tasks:
        pk.set_adapter(model, name)
        row(f"adapter {name} alone")
    for method in COMBINATION_METHODS:
        density = 0.5 if any(k in method for k in ("ties", "dare", "magnitude")) else None
        try:
            combine(model, {"A": 1.0, "B": 1.0}, method=method, name=method, density=density, seed=0)
        except ConfigError as error:  # combine checks before touching the model: report it and go on
            row(method, note=f"not applicable: {error}")
            continue
        pk.set_adapter(model, method)
        ranks = sorted({int(m.rank[method]) for m in model.modules() if hasattr(m, "rank") and method in m.rank})
        row(f"{method} (rank {ranks[0] if len(ranks) == 1 else ranks})")
    return rows


def cell(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=[*ADAPTERS, "both"], default="both", help="adapter type (default both)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the rows, environment and git revision here")
    args = parser.parse_args()
    kinds = list(ADAPTERS) if args.method == "both" else [args.method]
    rows = [r for kind in kinds for r in run(args.steps, kind)]
    print("| adapter | method | MSE task A | MSE task B |\n|---|---|---:|---:|")
    for r in rows:
        label = f"{r['method']} ({r['note']})" if "note" in r else r["method"]
        print(f"| {ADAPTERS[str(r['adapter'])].__name__} | {label} | {cell(r['loss_A'])} | {cell(r['loss_B'])} |")
    if args.json:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
        record = {"rows": rows, "adapters": kinds, "steps": args.steps, "git": rev, "env": env}
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
