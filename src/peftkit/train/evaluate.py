"""Evaluation: loss and perplexity for LMs, accuracy and macro-F1 for classification, exact match
(SQuAD normalisation) for QA and seq2seq — and the same figures for the base model beside them.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftkit.train.batching import collate
from peftkit.train.config import EvalConfig
from peftkit.train.data import IGNORE, Example
from peftkit.train.tokenizer import Tokenizer


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_macro(preds: list[int], golds: list[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``preds`` or ``golds``."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def _batches(examples: list[Example], cfg: EvalConfig) -> Iterator[list[Example]]:
    for i, start in enumerate(range(0, len(examples), cfg.batch_size)):
        if cfg.max_batches and i >= cfg.max_batches:
            return
        yield examples[start : start + cfg.batch_size]


def _progress(items: Iterator[Any], label: str | None, total: int) -> Iterator[Any]:
    """``items``, behind a progress bar labelled ``label`` when one is given."""
    if not label:
        return items
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=label, total=total, leave=False, dynamic_ncols=True))


def label_count(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many terms ``transformers`` averages into ``batch``'s loss: examples, or labelled target tokens."""
    labels = batch["labels"]
    if task == "classification":
        return int(labels.numel())
    return int((labels[:, 1:] != IGNORE).sum()) if task == "causal_lm" else int((labels != IGNORE).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    task: str,
    tok: Tokenizer,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``examples``.

    Args:
        progress: show a progress bar (on stderr) with this label for the batches and the generated answers.

    Returns:
        ``loss`` and ``ppl`` (LMs) or ``loss``, ``accuracy`` and ``f1`` (classification), plus
        ``exact_match`` when examples carry reference answers (QA, seq2seq, instruction).
    """
    was_training = model.training
    model.eval()
    total, count, preds, golds = 0.0, 0, [], []
    n_batches = -(-len(examples) // cfg.batch_size)
    for chunk in _progress(_batches(examples, cfg), progress, min(n_batches, cfg.max_batches or n_batches)):
        batch = {k: v.to(device) for k, v in collate(chunk, tok.pad_id, task).items()}
        out = model(**batch)
        n = label_count(batch, task)
        total += float(out.loss) * n
        count += n
        if task == "classification":
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
    result: dict[str, float] = {"loss": total / max(count, 1)}
    if task == "classification":
        n_classes = int(getattr(getattr(model, "config", None), "num_labels", max(golds + preds) + 1))
        result["accuracy"] = sum(p == g for p, g in zip(preds, golds, strict=True)) / max(len(golds), 1)
        result["f1"] = f1_macro(preds, golds, n_classes)
    else:
        result["ppl"] = math.exp(min(result["loss"], 50.0))
        with_answers = [e for e in examples if e.get("answers")]
        if with_answers:
            result["exact_match"] = exact_match(model, with_answers, task, tok, cfg, device, progress)
    model.train(was_training)
    return result


def _generate(
    model: nn.Module, ex: Example, task: str, tok: Tokenizer, cfg: EvalConfig, device: torch.device | str
) -> str:
    """Greedy continuation of one example's prompt (causal LM) or source (seq2seq)."""
    ids = ex["input_ids"][: ex["prompt_len"]] if task == "causal_lm" else ex["input_ids"]
    x = torch.tensor([ids], device=device)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False, "pad_token_id": tok.pad_id}
    if tok.eos_id is not None:
        kwargs["eos_token_id"] = tok.eos_id
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)  # type: ignore[operator]
    new = out[0, len(ids) :] if task == "causal_lm" else out[0]
    return tok.decode(new.tolist())


def exact_match(
    model: nn.Module,
    examples: list[Example],
    task: str,
    tok: Tokenizer,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> float:
    """Share of examples whose greedy answer equals one reference after SQuAD normalisation."""
    limit = cfg.max_batches * cfg.batch_size if cfg.max_batches else len(examples)
    hits = 0
    subset = examples[:limit]
    for ex in _progress(iter(subset), progress and f"{progress} (answers)", len(subset)):
        answer = normalize_answer(_generate(model, ex, task, tok, cfg, device).split("\n")[0])
        hits += any(answer == normalize_answer(ref) for ref in ex["answers"])
    return hits / max(len(subset), 1)


def format_comparison(base: dict[str, float], adapted: dict[str, float]) -> str:
    """A small text table: metric | base | adapted."""
    keys = [k for k in adapted if k in base]
    lines = [f"{'metric':<12} {'base':>12} {'adapted':>12}"]
    for k in keys:
        lines.append(f"{k:<12} {base[k]:>12.4f} {adapted[k]:>12.4f}")
    return "\n".join(lines)
