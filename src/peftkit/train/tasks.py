"""Models per task: build the base ``transformers`` model, its tokenizer and the PEFT method config.

``checkpoint.pretrained`` is a local model directory (weights loaded), a directory or ``config.json``
without weights, or ``{"config": {...}}`` (random init). Whatever starts random — the whole model, or
a new head on pretrained weights — is seeded by ``train.seed``, so the same config always gives the
same base: evaluation and resume rebuild it identically.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, require
from peftkit.train.config import PEFT_METHODS, RunConfig, config_from_dict
from peftkit.train.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _config_dict(pretrained: str | dict[str, Any]) -> dict[str, Any] | None:
    """The transformers config to random-init from, or ``None`` when ``pretrained`` has weights."""
    if isinstance(pretrained, dict):
        return dict(pretrained["config"])
    p = Path(pretrained)
    if p.is_file() and p.suffix == ".json":
        return dict(json.loads(p.read_text()))
    if not p.is_dir():
        raise ConfigError(
            f"checkpoint.pretrained={pretrained!r} is not a local directory or config.json; "
            "pass a model directory or {'config': {'model_type': ...}} (no hub downloads)"
        )
    if any((p / f).exists() for f in WEIGHT_FILES):
        return None
    if (p / "config.json").exists():
        return dict(json.loads((p / "config.json").read_text()))
    raise ConfigError(f"checkpoint.pretrained={pretrained!r} has neither weights nor config.json")


def check_model_path(model_path: str, name: str) -> None:
    """Refuse a base-model path a command was given that names no local model, calling it ``name`` (``--model``).

    Raises:
        ConfigError: ``model_path`` is neither a ``.json`` file nor a directory with weights or ``config.json``.
    """
    p = Path(model_path)
    if p.is_file() and p.suffix == ".json":
        return
    if not p.is_dir():
        raise ConfigError(f"{name} {model_path!r} is not a local model directory or config.json; pass one "
                          "(no hub downloads)")
    if not any((p / f).exists() for f in (*WEIGHT_FILES, "config.json")):
        raise ConfigError(f"{name} {model_path!r} has neither weights nor config.json; pass a transformers model "
                          "directory or its config.json")


def model_config(model_path: str, task: str, num_labels: int = 0, peft: dict[str, Any] | None = None) -> RunConfig:
    """A run config that names only a model (and ``peft``), defaults elsewhere.

    The config of the commands that start from a model rather than a run (``inspect``, ``combine``, ``prune``).

    Args:
        model_path: a local model directory or ``config.json`` (``checkpoint.pretrained``).
        task: the model's task head (``model.task``).
        num_labels: ``model.num_labels``.
        peft: the ``peft`` section (default: the config's default).

    Raises:
        ConfigError: a value is invalid.
    """
    data: dict[str, Any] = {"checkpoint": {"pretrained": model_path}, "model": {"task": task, "num_labels": num_labels}}
    if peft is not None:
        data["peft"] = peft
    return config_from_dict(data)


def _head_fields(cfg: RunConfig, num_labels: int) -> dict[str, Any]:
    """Config fields of the task head: ``num_labels`` for classification."""
    if cfg.model.task != "classification":
        return {}
    n = cfg.model.num_labels or num_labels
    if n <= 0:
        raise ConfigError("model.num_labels=0 and no labels found in the data; set model.num_labels")
    return {"num_labels": n}


def _rejections() -> tuple[type[Exception], ...]:
    """What ``transformers`` raises for config values it rejects (since v5 also huggingface_hub's
    strict-dataclass validation errors, which are not ``ValueError``)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def _rejected(exc: Exception) -> ConfigError:
    """``exc`` (transformers rejecting ``checkpoint.pretrained.config``) as one line naming the field."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()).rstrip(".")
    return ConfigError(f"checkpoint.pretrained.config is rejected by transformers: {message}; fix these values")


def _config_from_fields(transformers: Any, raw: dict[str, Any], extra: dict[str, Any]) -> Any:
    """A ``transformers`` config from ``checkpoint.pretrained``'s fields plus the head's.

    Raises:
        ConfigError: no or an unknown ``model_type``, or values ``transformers`` rejects.
    """
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ConfigError("checkpoint.pretrained config lacks 'model_type'; add e.g. model_type: llama")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:  # transformers' own message lists all ~800 types
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "use one, e.g. model_type: llama"
        raise ConfigError(f"checkpoint.pretrained.config model_type={model_type!r} is unknown to transformers; {hint}")
    fields = {**raw, **extra}
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except _rejections() as exc:
        raise _rejected(exc) from None
    for key, value in fields.items():  # some configs override keyword arguments in __init__
        if getattr(config, key, value) != value:
            setattr(config, key, value)
    return config


def _from_config(auto: Any, config: Any) -> nn.Module:
    """``auto.from_config(config)``; some architectures check their config only when built."""
    try:
        return auto.from_config(config)  # type: ignore[no-any-return]
    except _rejections() as exc:
        raise _rejected(exc) from None


def build_model(cfg: RunConfig, num_labels: int = 0, *, meta: bool = False) -> nn.Module:
    """The base model of ``cfg`` for its task (no adapter yet).

    Args:
        cfg: the run config (``model``, ``checkpoint.pretrained``, ``train.seed``).
        num_labels: classes for classification (``model.num_labels`` wins when set).
        meta: build on the ``meta`` device from the config alone: structure and shapes, no memory,
            no weights read (what ``peftkit inspect`` needs, even for 7B-class models).

    Raises:
        ConfigError: the pretrained path is unusable, or classification without a label count.
        MissingDependencyError: ``transformers`` is not installed.
    """
    transformers: Any = require("transformers", "hf")
    auto = getattr(transformers, AUTO_CLASSES[cfg.model.task])
    dtype = getattr(torch, cfg.model.dtype)
    extra = _head_fields(cfg, num_labels)
    raw = _config_dict(cfg.checkpoint.pretrained)  # type: ignore[arg-type]
    if meta:
        if raw is None:
            config = transformers.AutoConfig.from_pretrained(str(cfg.checkpoint.pretrained), **extra)
        else:
            config = _config_from_fields(transformers, raw, extra)
        with torch.device("meta"):
            return _from_config(auto, config).to(dtype)
    # Seeded on every path: random weights (a whole random-init model, or the new head of a
    # pretrained encoder) are the same each time, so evaluation rebuilds exactly the trained base.
    torch.manual_seed(cfg.train.seed)
    if raw is None:
        model = auto.from_pretrained(str(cfg.checkpoint.pretrained), dtype=dtype, **extra)
    else:
        model = _from_config(auto, _config_from_fields(transformers, raw, extra)).to(dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model  # type: ignore[no-any-return]


def build_tokenizer(cfg: RunConfig) -> Tokenizer:
    """``model.tokenizer``, else the pretrained directory's tokenizer, else :class:`ByteTokenizer`."""
    path = cfg.model.tokenizer
    if path is None and isinstance(cfg.checkpoint.pretrained, str):
        p = Path(cfg.checkpoint.pretrained)
        path = str(p.parent if p.is_file() else p)
    return load_tokenizer(path)


def check_vocab(model: nn.Module, tok: Tokenizer) -> None:
    """Fail early when the tokenizer's ids do not fit the model's embedding, and share the pad id.

    Raises:
        ConfigError: the vocabulary is too small.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and tok.vocab_size > vocab:
        hint = " (peftkit's byte tokenizer needs vocab_size >= 259)" if isinstance(tok, ByteTokenizer) else ""
        raise ConfigError(
            f"model vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size}{hint}; "
            "raise vocab_size in the config or set model.tokenizer"
        )
    config: Any = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_id


def peft_config(cfg: RunConfig) -> Any:
    """The peftkit method config (e.g. ``pk.LoRA(...)``) for ``cfg.peft``; ``None`` for ``none``.

    Raises:
        ConfigError: the method is not available in this peftkit, or its fields are rejected.
    """
    import peftkit as pk

    cls_name = PEFT_METHODS[cfg.peft.method]
    if cls_name is None:
        return None
    cls = getattr(pk, cls_name, None)
    if cls is None:
        raise ConfigError(
            f"peft.method={cfg.peft.method!r} is not available in this peftkit "
            f"(no peftkit.{cls_name}); choose another method"
        )
    try:
        method = cls(**cfg.peft.options)
    except TypeError as exc:  # a field another method has, e.g. a LoRA config's rank after peft.method=ia3
        fields = {f.name for f in dataclasses.fields(cls)}
        removals = " ".join(f"~peft.{k}" for k in cfg.peft.options if k not in fields)
        where = f" (on the command line: {removals})" if removals else ""
        raise ConfigError(f"peft options {cfg.peft.options} are invalid for {cls_name}: {exc}; remove those fields "
                          f"from the config's peft section{where} to use peft.method={cfg.peft.method}") from None
    init = getattr(method, "init", None)
    if init in ("eva", "corda"):  # computed from data by pk.init_eva / pk.init_corda, which a run does not call
        raise ConfigError(f"peft.init={init!r} is computed from data after the adapter is applied "
                          f"(pk.init_{init} in Python), which a training run does not do; apply and initialise it "
                          "in Python and train it with your own loop, or choose another init")
    return method


def apply_peft(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply ``cfg.peft`` to ``model`` in place (``none``: every parameter stays trainable)."""
    method = peft_config(cfg)
    if method is not None:
        import peftkit as pk

        pk.apply(model, method)
    return model


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean loss of ``batch`` (``transformers`` computes it from ``labels`` for every task here)."""
    return model(**batch).loss  # type: ignore[no-any-return]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
