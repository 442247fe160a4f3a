"""One config for a whole fine-tuning run.

A :class:`RunConfig` groups nine small dataclasses — ``model``, ``peft``, ``data``, ``train``,
``optimizer``, ``scheduler``, ``checkpoint``, ``logging``, ``eval`` — in the spirit of Megatron
Bridge's ``ConfigContainer``. YAML only serialises them; every field is type-checked and validated
when the dataclass is built, and errors name the field, the value and what is allowed::

    cfg = load_config("configs/tiny_llama_lora.yaml", ["train.max_steps=20", "peft.rank=4"])

(``load_config`` and friends live in :mod:`peftkit.train.config_load`.)

``checkpoint.pretrained`` is required: a local model directory (or ``config.json``) or a mapping
``{"config": {"model_type": "llama", ...}}`` that builds a randomly initialised ``transformers``
model offline.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from peftkit.errors import ConfigError

Task = Literal["causal_lm", "seq2seq", "classification"]
DataFormat = Literal["auto", "text", "instruction", "chat", "classification", "seq2seq", "qa"]


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` naming ``name``, ``value`` and ``allowed`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid; allowed: {allowed}")


@dataclass
class ModelConfig:
    """The base model and how it runs.

    Attributes:
        task: ``causal_lm``, ``seq2seq`` (T5-style) or ``classification`` (sequence classification).
        num_labels: number of classes for ``classification``; 0 infers it from the training data.
        dtype: dtype the base weights are loaded in.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        tokenizer: tokenizer directory; ``None`` uses ``checkpoint.pretrained`` or, for a random-init
            model without one, peftkit's byte-level tokenizer.
    """

    task: Task = "causal_lm"
    num_labels: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        _require(self.num_labels >= 0, "model.num_labels", self.num_labels, "an integer >= 0")


#: ``peft.method`` names and the peftkit config class each builds (``none``: no adapter, e.g. GaLore/LISA).
PEFT_METHODS: dict[str, str | None] = {
    "none": None,
    "lora": "LoRA",
    "canonical_lora": "CanonicalLoRA",
    "dora": "DoRA",
    "adalora": "AdaLoRA",
    "ia3": "IA3",
    "loha": "LoHa",
    "lokr": "LoKr",
    "oft": "OFT",
    "boft": "BOFT",
    "hra": "HRA",
    "hira": "HiRA",
    "miss": "MiSS",
    "bitfit": "BitFit",
    "vera": "VeRA",
    "vblora": "VBLoRA",
    "unilora": "UniLoRA",
    "fourierft": "FourierFT",
    "beft": "BEFT",
    "randlora": "RandLoRA",
    "road": "RoAd",
    "glora": "GLoRA",
    "shira": "SHiRA",
    "c3a": "C3A",
    "gralora": "GraLoRA",
    "delora": "DeLoRA",
    "lily": "Lily",
    "poly": "Poly",
    "osf": "OSF",
    "xlora": "XLoRA",
    "ln_tuning": "LNTuning",
    "adapter": "Adapter",
    "adaption_prompt": "AdaptionPrompt",
    "prompt_tuning": "PromptTuning",
    "prefix_tuning": "PrefixTuning",
    "p_tuning": "PTuning",
    "cpt": "CPT",
    "trainable_tokens": "TrainableTokens",
}


@dataclass
class PeftSection:
    """The PEFT method: ``method`` plus that method's own fields (passed to its config class).

    Attributes:
        method: one of :data:`PEFT_METHODS` (``none`` trains the base weights, e.g. with GaLore or LISA).
        options: the method's fields, e.g. ``{"rank": 8, "alpha": 16, "target_modules": ["q", "v"]}``.
            In YAML and overrides they are written flat: ``peft.rank=8``.
    """

    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        close = difflib.get_close_matches(str(self.method), PEFT_METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _require(self.method in PEFT_METHODS, "peft.method", self.method, ", ".join(PEFT_METHODS) + hint)


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens.

    Attributes:
        train: a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``datasets`` directory saved to disk.
        eval: held-out file; ``None`` splits ``eval_fraction`` off ``train``.
        format: ``text``, ``instruction`` (instruction/input/output), ``chat`` (``messages``),
            ``classification`` (text,label), ``seq2seq`` (source,target), ``qa`` (SQuAD-style);
            ``auto`` picks from the columns of the first row.
        max_length: tokens per example (longer ones are truncated).
        packing: concatenate causal-LM examples into ``max_length`` blocks.
        skip_bad_rows: skip and count malformed rows instead of failing on the first one.
        eval_fraction: share of ``train`` held out when ``eval`` is not given.
        limit: use at most this many rows of each file (0: all).
        labels: class names in label-id order for ``classification``; empty infers them (sorted).
        cache_dir: tokenisation cache directory (``None``: no cache).
        group_by_length: batch examples of similar length together (less padding, faster on CPU).
    """

    train: str = ""
    eval: str | None = None
    format: DataFormat = "auto"
    max_length: int = 512
    packing: bool = False
    skip_bad_rows: bool = False
    eval_fraction: float = 0.0
    limit: int = 0
    labels: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    group_by_length: bool = False

    def __post_init__(self) -> None:
        _require(self.max_length > 0, "data.max_length", self.max_length, "an integer > 0")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "0 <= x < 1")
        _require(self.limit >= 0, "data.limit", self.limit, "an integer >= 0")


@dataclass
class TrainConfig:
    """Length, batch and numerics of the run.

    Attributes:
        max_steps: optimizer steps; 0 runs ``epochs`` full passes instead.
        epochs: passes over the training data when ``max_steps`` is 0.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: clip the global gradient norm to this (0: no clipping; the norm is still logged).
        precision: ``bf16`` runs the forward pass under bfloat16 autocast.
        seed: seeds weights, dropout and data order.
        device: ``auto`` picks CUDA when available.
        parallel: ``ddp`` or ``fsdp`` under ``torchrun`` (see ``peftkit.train.distributed``); ``none``: one process.
        dist_timeout: seconds a collective may wait for its peers before the run fails.
    """

    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: str = "auto"
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    dist_timeout: int = 1800

    def __post_init__(self) -> None:
        _require(self.max_steps >= 0, "train.max_steps", self.max_steps, "an integer >= 0")
        _require(self.max_steps > 0 or self.epochs > 0, "train.epochs", self.epochs, "> 0 when max_steps is 0")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "an integer > 0")
        _require(self.grad_accum > 0, "train.grad_accum", self.grad_accum, "an integer > 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        _require(self.dist_timeout > 0, "train.dist_timeout", self.dist_timeout, "seconds > 0")


@dataclass
class OptimizerConfig:
    """AdamW, optionally with LoRA+ learning rates, GaLore projection or LISA layer sampling.

    Attributes:
        name: ``adamw``, or ``galore`` (AdamW whose chosen 2-D weights get low-rank projected gradients).
        lr, weight_decay, betas, eps: AdamW's hyper-parameters.
        loraplus_ratio: LoRA+ — LoRA's B matrices (and, as in HF PEFT, other 1-D parameters except DoRA
            magnitudes) get ``lr * loraplus_ratio`` (0: off; paper: 16).
        galore_rank, galore_update_interval, galore_scale: GaLore's projection rank, steps between
            projector refreshes (SVD of the current gradient), and the update scale α.
        galore_targets: globs of the 2-D parameters GaLore projects (default: every 2-D weight
            under an attention or MLP block, matched by name glob).
        lisa_layers: LISA — number of transformer layers trained at a time (0: off).
        lisa_interval: steps between LISA re-samplings.
    """

    name: Literal["adamw", "galore"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    loraplus_ratio: float = 0.0
    galore_rank: int = 128
    galore_update_interval: int = 200
    galore_scale: float = 0.25
    galore_targets: list[str] = field(default_factory=lambda: ["*attn*.weight", "*attention*.weight", "*mlp*.weight"])
    lisa_layers: int = 0
    lisa_interval: int = 20

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "a float > 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "two floats in [0, 1)",
        )
        _require(self.loraplus_ratio >= 0, "optimizer.loraplus_ratio", self.loraplus_ratio, ">= 0 (0: off)")
        _require(self.galore_rank > 0, "optimizer.galore_rank", self.galore_rank, "an integer > 0")
        _require(
            self.galore_update_interval > 0,
            "optimizer.galore_update_interval",
            self.galore_update_interval,
            "an integer > 0",
        )
        _require(self.lisa_layers >= 0, "optimizer.lisa_layers", self.lisa_layers, "an integer >= 0 (0: off)")
        _require(self.lisa_interval > 0, "optimizer.lisa_interval", self.lisa_interval, "an integer > 0")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then cosine, linear or constant.

    Attributes:
        name: decay shape after warm-up.
        warmup_steps: warm-up length; ``warmup_ratio`` is used when this is 0.
        warmup_ratio: warm-up as a share of all steps.
        min_lr_ratio: the learning rate decays to ``lr * min_lr_ratio``.
    """

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "scheduler.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0 <= self.warmup_ratio < 1, "scheduler.warmup_ratio", self.warmup_ratio, "0 <= x < 1")
        _require(0 <= self.min_lr_ratio <= 1, "scheduler.min_lr_ratio", self.min_lr_ratio, "0 <= x <= 1")


@dataclass
class CheckpointConfig:
    """The base model to start from and where training checkpoints go.

    Attributes:
        pretrained: required — a local model directory, a ``config.json`` path, or
            ``{"config": {"model_type": ..., ...}}`` for a randomly initialised model.
        save_dir: output directory (checkpoints ``step-N/``, metrics, plots, ``final/``).
        save_interval: steps between checkpoints (0: only at the end).
        keep_last: checkpoints kept on disk (older ones are deleted; 0 keeps all).
        resume: ``none``, ``auto`` (the latest checkpoint in ``save_dir``, if any) or a checkpoint path.
    """

    pretrained: str | dict[str, Any] | None = None
    save_dir: str = "runs/run"
    save_interval: int = 0
    keep_last: int = 2
    resume: str = "none"

    def __post_init__(self) -> None:
        _require(
            self.pretrained not in (None, "", {}),
            "checkpoint.pretrained",
            self.pretrained,
            "a local model directory, a config.json path, or {'config': {...}} (required for PEFT)",
        )
        if isinstance(self.pretrained, dict):
            _require(
                isinstance(self.pretrained.get("config"), dict) and "model_type" in self.pretrained["config"],
                "checkpoint.pretrained",
                self.pretrained,
                "{'config': {'model_type': ..., ...}}",
            )
        _require(self.save_interval >= 0, "checkpoint.save_interval", self.save_interval, "an integer >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "an integer >= 0 (0: keep all)")


@dataclass
class LoggingConfig:
    """What the run reports.

    Attributes:
        progress_bar: a tqdm bar with loss, learning rate and tokens/s.
        log_interval: steps between metric records.
        jsonl: write ``metrics.jsonl`` in ``save_dir``.
        tensorboard: ``auto`` writes TensorBoard events when it is installed; ``true`` requires it.
        plots: PNG plots of loss, learning rate and gradient norm at the end (needs matplotlib).
    """

    progress_bar: bool = True
    log_interval: int = 1
    jsonl: bool = True
    tensorboard: Literal["auto", "true", "false"] = "auto"
    plots: bool = True

    def __post_init__(self) -> None:
        _require(self.log_interval > 0, "logging.log_interval", self.log_interval, "an integer > 0")


@dataclass
class EvalConfig:
    """Evaluation during and after training.

    Attributes:
        interval: steps between evaluations (0: only at the end).
        batch_size: examples per evaluation batch.
        max_batches: cap on evaluation batches (0: all).
        max_new_tokens: generation length for exact match (QA, seq2seq).
    """

    interval: int = 0
    batch_size: int = 16
    max_batches: int = 0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        _require(self.interval >= 0, "eval.interval", self.interval, "an integer >= 0")
        _require(self.batch_size > 0, "eval.batch_size", self.batch_size, "an integer > 0")
        _require(self.max_batches >= 0, "eval.max_batches", self.max_batches, "an integer >= 0")


@dataclass
class RunConfig:
    """Everything one run needs; see the section classes for each field."""

    checkpoint: CheckpointConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data (``peft`` flattened: ``{method, **options}``)."""
        out = dataclasses.asdict(self)
        out["peft"] = {"method": self.peft.method, **self.peft.options}
        return out


# Loading lives in its own module; re-exported here so `from peftkit.train.config import load_config` works.
from peftkit.train.config_load import (  # noqa: E402
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    with_absolute_paths,
)

__all__ = [
    "PEFT_METHODS",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PeftSection",
    "RunConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "with_absolute_paths",
]
