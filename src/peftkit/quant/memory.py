"""How much memory a model takes, and how much training it would take: full, LoRA or QLoRA.

``memory_report`` measures a live model from its tensors' sizes. ``estimate_training_memory`` works on
a model on the ``meta`` device (no memory allocated), e.g. Llama-2-7B's shape from its config::

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(...))   # 6.7B parameters, nothing allocated
    pk.estimate_training_memory(model, method="qlora", rank=16)

Model of the estimate (per parameter): frozen weights at their storage size (2 bytes in fp16, about
0.52 byte in NF4 with double quantization (4.127 bits), 1 byte + 1 fp32 per row in int8); each
trainable parameter adds its weight, its gradient and AdamW's two fp32 moments (with fp32 master
weights and gradients for half-precision full fine-tuning, 16 bytes per parameter in all, as in
ZeRO, Rajbhandari et al., 2020). Activations are not included: they depend on batch and sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.core.matching import first_match
from peftkit.core.registry import linear_kind
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.quant.bnb import packed_tensors
from peftkit.quant.layers import QuantLinear, quantized_nbytes

GIB = 1024**3


@dataclass
class MemoryReport:
    """Bytes of a model's state, by category.

    Attributes:
        weights_by_dtype: bytes of frozen float parameters and buffers, by dtype name.
        quantized: bytes of quantized weights and their constants (peftkit's layers and bitsandbytes').
        trainable: bytes of trainable parameters (adapters, or everything in full fine-tuning).
        trainable_params: number of trainable parameters.
        gradients: bytes of their gradients (same dtype as the parameters).
        optimizer: estimated bytes of optimizer state (AdamW: two fp32 moments per trainable parameter).
    """

    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    quantized: int = 0
    trainable: int = 0
    trainable_params: int = 0
    gradients: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        """All bytes above."""
        return sum(self.weights_by_dtype.values()) + self.quantized + self.trainable + self.gradients + self.optimizer

    def as_dict(self) -> dict[str, float]:
        """GiB per category, for tables and JSON."""
        rows = {f"weights[{k}]": v for k, v in self.weights_by_dtype.items()}
        rows |= {"quantized": self.quantized, "trainable": self.trainable, "gradients": self.gradients}
        rows |= {"optimizer": self.optimizer, "total": self.total}
        return {k: v / GIB for k, v in rows.items()}

    def __str__(self) -> str:
        lines = [f"{k:<20} {v * 1024:12.3f} MiB" for k, v in self.as_dict().items()]
        return "\n".join(lines + [f"{'trainable params':<20} {self.trainable_params:>14,}"])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_report(model: nn.Module, optimizer_bytes_per_param: int = 8) -> MemoryReport:
    """Measure ``model``'s weights (by dtype and quantized), trainable parameters and optimizer state.

    Works on the ``meta`` device too (sizes only).

    Args:
        model: any module.
        optimizer_bytes_per_param: optimizer state per trainable parameter (AdamW: 8, 8-bit Adam: 2, SGD: 0).

    Returns:
        A :class:`MemoryReport`.
    """
    report = MemoryReport()
    quantized_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            report.quantized += quantized_nbytes(module)
            quantized_ids.update(id(b) for b in module.buffers(recurse=False))
        elif (packed := packed_tensors(module)) is not None:  # bitsandbytes' layers: codes are uint8/int8 parameters
            report.quantized += sum(_nbytes(t) for t in packed)
            quantized_ids.update(id(t) for t in packed)
    seen: set[int] = set()
    tensors = [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]
    for _, t in tensors:
        if id(t) in seen or id(t) in quantized_ids:
            continue
        seen.add(id(t))
        if isinstance(t, nn.Parameter) and t.requires_grad:
            report.trainable += _nbytes(t)
            report.trainable_params += t.numel()
            report.gradients += _nbytes(t)
            report.optimizer += t.numel() * optimizer_bytes_per_param
        else:
            key = str(t.dtype).removeprefix("torch.")
            report.weights_by_dtype[key] = report.weights_by_dtype.get(key, 0) + _nbytes(t)
    return report


# Stored bits per weight of each frozen base format.
_BITS = {"nf4": 4 + 8 / 64 + 32 / (64 * 256), "fp16": 16.0, "bf16": 16.0, "fp32": 32.0, "int8": 8.0}


def _lora_parameters(module: nn.Module, rank: int) -> int:
    """The parameters of a rank-``rank`` LoRA adapter on ``module`` (A: r × in, B: out × r)."""
    kind = linear_kind(module)
    if kind is not None:  # nn.Linear, GPT-2's Conv1D, quantized linears
        return rank * (kind.in_features(module) + kind.out_features(module))
    if isinstance(module, nn.Embedding):
        return rank * (module.num_embeddings + module.embedding_dim)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # A: a convolution in → r with the base's kernel; B: 1×1
        return rank * (module.in_channels * math.prod(module.kernel_size) + module.out_channels)
    raise UnsupportedLayerError(f"no LoRA parameter count for {type(module).__name__}")


_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def estimate_training_memory(
    model: nn.Module,
    method: str = "lora",
    rank: int = 16,
    target_modules: str | Sequence[str] | None = None,
    dtype: str = "fp16",
    skip: str | Sequence[str] = ("lm_head",),
) -> MemoryReport:
    """Estimate training memory (without activations) for ``model``'s shape; no tensor is allocated.

    Args:
        model: a model, typically built on the ``meta`` device.
        method: ``"full"`` (every parameter trained, mixed precision with fp32 master weights),
            ``"lora"`` (frozen ``dtype`` base), ``"qlora"`` (frozen NF4 base, double-quantized, for the
            linear layers not in ``skip``; the rest stays in ``dtype``) or ``"qlora8"`` (int8 base).
        rank: LoRA rank, for ``"lora"``/``"qlora"``.
        target_modules: the layers carrying adapters (names, globs or ``"all-linear"``, as in ``target_modules``;
            a str is one pattern), each of which must match a layer LoRA adapts (``nn.Linear``, GPT-2's ``Conv1D``,
            ``nn.Embedding``, ``nn.Conv*d``, ...), counted as ``pk.apply(model, pk.LoRA(...))`` would add it.
            Default: Llama's attention and MLP projections (``q_proj`` … ``down_proj``), those the model has; on a
            model with none of them, what ``pk.LoRA()`` adapts on its architecture (GPT-2: ``c_attn``), else none.
        dtype: the base's float format: ``"fp16"``, ``"bf16"`` or ``"fp32"``.
        skip: linear layers a QLoRA base keeps in ``dtype`` (the output head by default).

    Returns:
        A :class:`MemoryReport` of the estimate (adapters trained in fp32, AdamW).

    Raises:
        ConfigError: unknown ``method`` (another PEFT method's name or config: apply it on ``meta`` and use
            :func:`memory_report`) or ``dtype``.
        TargetNotFoundError: a ``target_modules`` pattern matches no module (not checked for ``"full"``).
        UnsupportedLayerError: a pattern matches only layers LoRA cannot adapt.
    """
    if target_modules is None:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_kind(m) is not None}
        targets = [t for t in _DEFAULT_TARGETS if t in names]
        if not targets:  # not Llama-like: what pk.LoRA() adapts on this architecture, if it has defaults
            from peftkit.methods.default_targets import LORA_TARGETS, model_type

            targets = list(LORA_TARGETS.get(model_type(model) or "", ()))
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    skip = [skip] if isinstance(skip, str) else list(skip)
    if not isinstance(method, str) or method not in ("full", "lora", "qlora", "qlora8"):
        shown = repr(method) if isinstance(method, str) else type(method).__name__
        raise ConfigError(
            f"method={shown} is not supported: the estimate is for full fine-tuning, LoRA and QLoRA ('full', 'lora', "
            "'qlora', 'qlora8'). For another method (VeRA, LoHa, OFT, HRA, adaption prompts, ...), pk.apply it to the "
            "model built on the meta device and read pk.memory_report(model), which counts its tensors"
        )
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"dtype={dtype!r} is not supported; use 'fp16', 'bf16' or 'fp32'")
    report = MemoryReport()
    total = sum(p.numel() for p in model.parameters())
    if method == "full":
        # half weights + half grads + fp32 master copy + two fp32 moments (ZeRO's 2+2+12 bytes)
        half = dtype != "fp32"
        report.trainable = total * (2 if half else 4)
        report.trainable_params = total
        report.gradients = total * (2 if half else 4)
        report.optimizer = total * (12 if half else 8)
        return report
    from peftkit.methods.lora import LoRA  # here: LoRA's LoftQ initialisation imports peftkit.quant

    # The layers LoRA itself would adapt: its target resolution and its registry of layer kinds.
    adapted = set(LoRA(target_modules=targets, rank=rank).resolve(model) if targets else ())
    base_bits = {"lora": _BITS[dtype], "qlora": _BITS["nf4"], "qlora8": _BITS["int8"]}[method]
    quantized = 0
    for name, m in model.named_modules():
        if name in adapted:
            report.trainable_params += _lora_parameters(m, rank)
        if isinstance(m, nn.Linear) and method != "lora" and first_match(name, skip) is None:  # pk.quantize's
            quantized += m.weight.numel()
            report.quantized += int(m.weight.numel() * base_bits / 8)
            if method == "qlora8":
                report.quantized += 4 * m.out_features
    report.weights_by_dtype[dtype] = int((total - quantized) * _BITS[dtype] / 8)
    report.trainable = 4 * report.trainable_params
    report.gradients = 4 * report.trainable_params
    report.optimizer = 8 * report.trainable_params
    return report
