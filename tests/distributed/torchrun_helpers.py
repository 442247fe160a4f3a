"""Helpers to launch tiny runs with ``torchrun`` (2 CPU processes, gloo) and read their results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from tests.models import LLAMA_CONFIG

LLAMA = {**LLAMA_CONFIG, "max_position_embeddings": 64}
TEXT = ("the cat sat on the mat and the dog ran to the sun while the bird sang over the tree by the car " * 6).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(data: Path, save_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny LoRA run on a random-init Llama (hidden 32) with AdamW and no dropout."""
    cfg: dict[str, Any] = {
        "checkpoint": {"pretrained": {"config": LLAMA}, "save_dir": str(save_dir), "keep_last": 0},
        "model": {"task": "causal_lm"},
        "peft": {"method": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "rank": 4, "alpha": 8},
        "data": {"train": str(data), "format": "text", "max_length": 16, "packing": True},
        "train": {"max_steps": 4, "batch_size": 4, "seed": 3, "max_grad_norm": 1.0, "dist_timeout": 60},
        "optimizer": {"lr": 5e-3, "weight_decay": 0.01},
        "scheduler": {"name": "linear", "warmup_steps": 1},
        "logging": {"progress_bar": False, "plots": False, "tensorboard": "false"},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def torchrun(
    cfg: dict[str, Any],
    tmp: Path,
    nproc: int = 2,
    *overrides: str,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node N -m peftkit train CONFIG`` on CPU; returns the finished process."""
    path = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "peftkit",
        "train",
        str(path),
        *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def losses(save_dir: Path) -> list[float]:
    """Per-step losses from rank 0's ``metrics.jsonl``."""
    rows = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]
