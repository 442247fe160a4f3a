"""Tiny random-init models and small data files shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.models import LLAMA_CONFIG

LLAMA = {**LLAMA_CONFIG, "max_position_embeddings": 256}
T5 = {
    "model_type": "t5",
    "vocab_size": 260,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 2,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 260,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "initializer_range": 0.3,
}
WORDS = ["cat", "dog", "sun", "moon", "tree", "car", "fish", "bird"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def run_config(tmp_path: Path):
    """Build a config dict for a tiny run of ``task`` on generated data."""

    def make(task: str = "causal_lm", **sections: dict[str, Any]) -> dict[str, Any]:
        if task == "causal_lm":
            rows = [{"instruction": "Repeat", "input": w, "output": w} for w in WORDS * 4]
            model, peft = LLAMA, {"target_modules": ["q_proj", "v_proj"]}
        elif task == "seq2seq":
            rows = [{"source": f"copy: {w}", "target": w} for w in WORDS * 4]
            model, peft = T5, {"target_modules": ["q", "v"]}
        else:
            rows = [
                {"text": ("yes! " * 3 if i % 2 else "no... " * 3) + w, "label": "pos" if i % 2 else "neg"}
                for i, w in enumerate(WORDS * 4)
            ]
            model, peft = BERT, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
        data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
        cfg: dict[str, Any] = {
            "model": {"task": task},
            "checkpoint": {"pretrained": {"config": dict(model)}, "save_dir": str(tmp_path / "run")},
            "peft": {"method": "lora", "rank": 4, "alpha": 8, **peft},
            "data": {"train": str(data), "max_length": 48, "eval_fraction": 0.25},
            "train": {"max_steps": 8, "batch_size": 4, "seed": 0},
            "optimizer": {"lr": 0.01},
            "scheduler": {"name": "constant"},
            "logging": {"progress_bar": False, "plots": False, "tensorboard": "false"},
            "eval": {"max_new_tokens": 4, "max_batches": 1},
        }
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value}
        return cfg

    return make
