"""MiSS: a block of the weight update shared across the whole layer (formerly Bone).

Paper: Kang and Yin, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure"
(https://arxiv.org/abs/2409.15371).

A frozen weight W₀ (out × in) is cut along its input into blocks of r columns (the last one shorter when r does not
divide in). The default variant ("balance", ``init_weights=True``) trains one block D (r × out, ``miss_block``) and
adds its transpose to every block, ΔW[o, j] = D[j mod r, o]. So the update needs no ΔW::

    x ↦ W₀x + (Σ_k x_k) D         x_k: the k-th block of r input features (x zero-padded to a multiple of r)

``init_weights="mini"`` trains only r × ``mini_r`` and repeats it along the output (D = [M M … M], which needs
``mini_r`` to divide out). ``init_weights="bat"`` trains one r × r block B_a per block row a of the weight and
updates each block W_ac of W₀ *with itself*::

    W_ac ← W_ac + W_ac B_a + B_a        (in and out multiples of r)

so the update depends on W₀ (non-linear across shards). Several bat adapters act one after the other in their
active order, as in Hugging Face PEFT; unmerging solves W_ac (I + B_a) = W'_ac − B_a.

Every variant starts at zero (ΔW = 0); ``init_weights=False`` draws the balance block Kaiming-uniform. Dropout
(``dropout``, HF PEFT's ``miss_dropout``) acts on the input of the balance and mini updates. Tensor name, shapes,
the forward's arithmetic (zero padding and dropout masks included) and ``adapter_config.json`` follow Hugging Face
PEFT 0.21.2, on ``nn.Linear`` and quantized linear layers (merging into those re-quantizes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LINEAR_KINDS, LinearKind, is_fan_in_fan_out, linear_kind, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.ordered import merge_in_order, reordering, unmerge_in_order

logger = logging.getLogger("peftkit")

INIT_CHOICES: tuple[bool | str, ...] = (True, False, "bat", "mini")
BIAS_MODES = ("none", "all", "MiSS_only")


def is_linear(module: nn.Module) -> bool:
    """Whether MiSS can adapt ``module``: an ``nn.Linear`` or a quantized linear layer (those HF PEFT adapts; not
    GPT-2's transposed ``Conv1D``)."""
    return linear_kind(module) is not None and not is_fan_in_fan_out(module)


def supported_names() -> list[str]:
    return sorted(set(LINEAR_KINDS.names()) - {"Conv1D"})


def bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The bat update of ``weight`` (out × in): W_ac B_a + B_a in every r × r block, ``block`` (out/r, r, r)."""
    r = block.shape[-1]
    blocks = weight.reshape(weight.shape[0] // r, r, weight.shape[1] // r, r).permute(2, 0, 1, 3)  # [c, a]
    return (blocks @ block + block).permute(1, 2, 0, 3).reshape(weight.shape)


def bat_undo(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The weight whose bat update with ``block`` is ``weight``: W_ac = (W'_ac − B_a)(I + B_a)⁻¹.

    Raises:
        MergeError: some I + B_a is singular, so the update cannot be undone.
    """
    r = block.shape[-1]
    blocks = weight.reshape(weight.shape[0] // r, r, weight.shape[1] // r, r).permute(2, 0, 1, 3)
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    try:
        undone = torch.linalg.solve(eye + block, blocks - block, left=False)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise MergeError(f"a bat block I + B is singular, so its update cannot be taken out of the weight ({exc})") \
            from exc
    return cast(torch.Tensor, undone).permute(1, 2, 0, 3).reshape(weight.shape)


class MiSSLayer(AdapterLayer):
    """MiSS adapters on a linear layer: balance and mini adapters add ``(Σ_k x_k) D`` to the base layer's output;
    bat adapters update its (dequantized) weight block by block. A layer's adapters are all bat or none
    (``MiSS.resolve`` checks). Merging into a quantized layer re-quantizes (the error is logged and kept in
    ``merge_errors``).

    Raises:
        UnsupportedLayerError: ``base_layer`` is not a linear layer.
    """

    folds_into_weight = True
    adapter_containers = ("miss_block",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not is_linear(base_layer):
            raise UnsupportedLayerError(f"MiSS cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(supported_names())}")
        self.in_features = self.kind.in_features(base_layer)
        self.out_features = self.kind.out_features(base_layer)
        self.miss_block = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        #: Each adapter's variant: ``"balance"``, ``"bat"`` or ``"mini"``.
        self.variant: dict[str, str] = {}
        self.dropout: dict[str, float] = {}
        #: Adapter name → the largest re-quantization error its merge made in a quantized base weight.
        self.merge_errors: dict[str, float] = {}

    @property
    def kind(self) -> LinearKind:
        # Looked up, not stored: the layer stays picklable (kinds hold lambdas).
        return cast(LinearKind, linear_kind(self.base_layer))

    def add(self, name: str, rank: int, *, init_weights: bool | str = True, mini_r: int = 1,
            dropout: float = 0.0) -> None:
        """Add adapter ``name`` (zero, or with ``init_weights=False`` drawn from the global generator on the CPU as
        HF PEFT draws it; over a half-precision base rounded to its dtype and kept in fp32)."""
        variant = init_weights if isinstance(init_weights, str) else "balance"
        shape = {"balance": (rank, self.out_features), "mini": (rank, mini_r),
                 "bat": (self.out_features // rank, rank, rank)}[variant]
        block = torch.zeros(shape)
        if init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        weight, stored = self.kind.weight(self.base_layer), getattr(self.base_layer, "weight", None)
        if isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point:  # as HF PEFT: a float base's dtype
            block = block.to(stored.dtype)
        self.miss_block[name] = nn.Parameter(block.to(weight.device, adapter_dtype(weight)))
        self.rank[name] = rank
        self.variant[name] = variant
        self.dropout[name] = dropout

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for table in (self.rank, self.variant, self.dropout, self.merge_errors):
            table.pop(name, None)

    def shared_block(self, name: str) -> torch.Tensor:
        """A balance or mini adapter's D (r × out): a mini block repeated along the output."""
        block: torch.Tensor = self.miss_block[name]
        if self.variant[name] == "mini":
            return block.repeat(1, self.out_features // block.shape[1])
        return block

    def delta_weight(self, name: str) -> torch.Tensor:
        """A balance or mini adapter's ΔW (out × in): Dᵀ repeated along the input, cut to its width."""
        shared = self.shared_block(name).t()
        return shared.repeat(1, math.ceil(self.in_features / self.rank[name]))[:, : self.in_features]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._applied()
        if names and self.variant[names[0]] == "bat":
            weight = self.kind.weight(self.base_layer)  # dequantized, in the compute dtype
            for name in names:  # one after the other: each updates the weight the previous ones left
                block = self.miss_block[name]
                weight = weight.to(block.dtype)
                weight = weight + bat_delta(weight, block)
            bias = self.bias
            return F.linear(x.to(weight.dtype), weight, bias.to(weight.dtype) if bias is not None else None).to(x.dtype)
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        h = x
        for name in names:
            shared = self.shared_block(name)
            r = shared.shape[0]
            # The padding accumulates over the adapters, as in HF PEFT: a later dropout mask has HF PEFT's shape.
            h = (F.pad(h, (0, r - h.shape[-1] % r)) if h.shape[-1] % r else h).to(shared.dtype)
            dropped = F.dropout(h, self.dropout[name], self.training) if self.dropout[name] > 0 else h
            result = result + dropped.reshape(*h.shape[:-1], h.shape[-1] // r, r).sum(dim=-2) @ shared
        return result.to(x.dtype)

    # -- merging --------------------------------------------------------------------------------------
    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        """Refuse a merge that would reorder active bat adapters: the merged ones act first (they are in the
        weight), and their updates do not commute. (Balance and mini updates are sums: any order.)"""
        if not any(self.variant.get(n) == "bat" for n in self.adapter_names):
            return
        order = reordering(self, names)
        if order is not None:
            before, after = order
            raise MergeError(
                f"merging {list(names)} at {where or 'Linear'} would apply the active MiSS bat adapters in the order "
                f"{after} instead of {before} (each updates the weight the previous ones left); merge them in their "
                "active order (pk.merge(model) merges every active adapter)"
            )

    @torch.no_grad()
    def _fold(self, name: str, undo: bool, safe: bool = False, where: str = "") -> None:
        kind, block = self.kind, self.miss_block[name]
        # In fp32 over a half-precision base or adapter (one rounding, at the end; CPU solves need fp32 too).
        dtype = torch.float32 if block.dtype in (torch.float16, torch.bfloat16) else block.dtype
        work = (kind.merge_weight or kind.weight)(self.base_layer).detach().to(dtype)
        if self.variant[name] == "bat":
            folded = bat_undo(work, block.to(dtype)) if undo else work + bat_delta(work, block.to(dtype))
        else:
            folded = work - self.delta_weight(name).to(dtype) if undo else work + self.delta_weight(name).to(dtype)
        if safe:
            self.check_finite(folded, where or "Linear", name)
        error = kind.set_weight(self.base_layer, folded)
        self.merge_errors.pop(name, None)
        if error is not None:
            if not undo:
                self.merge_errors[name] = error
            logger.info("%s MiSS adapter %r at a quantized %s: max abs re-quantization error %.3g",
                        "unmerged" if undo else "merged", name, where or type(self.base_layer).__name__, error)

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_in_order(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Take merged adapters out of the weight; bat updates depend on the weight, so those merged after the first
        one asked for come out too (last first) and go back in afterwards."""
        unmerge_in_order(self, names)


def _positive_int(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field_name}={value!r} must be a positive integer (e.g. 8)")


#: ``adapter_config.json`` fields of every PEFT config that do not change what an adapter computes.
_HF_FIELDS = frozenset(
    "r miss_dropout mini_r target_modules exclude_modules init_weights layers_to_transform layers_pattern bias "
    "modules_to_save".split())


@register_method
@dataclass
class MiSS(AdaptedBiases, AdapterConfig):
    """MiSS: one block of the update shared across the layer (HF PEFT's ``MissConfig``).

    Attributes:
        rank: the block's width r along the input (HF PEFT: ``r``); at most a target's in_features.
        dropout: dropout probability on the input of balance and mini updates, in [0, 1) (HF PEFT: ``miss_dropout``).
        mini_r: the width of a mini block along the output, which it is repeated to fill; must divide every
            target's out_features. Only with ``init_weights="mini"``.
        init_weights: the variant: ``True`` (balance, D = 0), ``False`` (balance, D random), ``"bat"`` (a block per
            block row, updating the weight with itself; r must divide in and out) or ``"mini"``.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"MiSS_only"`` (the biases of
            the adapted layers).

    Raises:
        ConfigError: a field out of range (named with its value), ``mini_r`` without ``"mini"``, or dropout with
            ``"bat"`` (which has none); in ``pk.apply``, a rank or ``mini_r`` a target's shape does not allow, or a
            bat adapter beside other variants on one layer.
        UnsupportedLayerError: in ``pk.apply``, a target that is not a linear layer (GPT-2's ``Conv1D`` included).
    """

    peft_type = "MISS"
    bias_layer = MiSSLayer
    bias_only = "MiSS_only"

    rank: int = 64
    dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("rank", self.rank)
        _positive_int("mini_r", self.mini_r)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in INIT_CHOICES):
            raise ConfigError(f"init_weights={self.init_weights!r} must be one of "
                              f"{', '.join(repr(c) for c in INIT_CHOICES)}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        if self.mini_r != 1 and self.init_weights != "mini":
            raise ConfigError(f"mini_r={self.mini_r} is used only with init_weights='mini' (HF PEFT ignores it "
                              f"otherwise); drop it, or pass init_weights='mini'")
        if self.dropout and self.init_weights == "bat":
            raise ConfigError(f"dropout={self.dropout} with init_weights='bat': the bat update has no dropout (HF "
                              "PEFT ignores miss_dropout there); drop it")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second MiSS adapter only
            return isinstance(module, MiSSLayer)
        return is_linear(module)

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked against the shapes the variant needs before the model changes."""
        targets = super().resolve(model)
        bat = self.init_weights == "bat"
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, MiSSLayer) else module
            kind = cast(LinearKind, linear_kind(base))
            fan_in, fan_out, r = kind.in_features(base), kind.out_features(base), self.rank
            if r > fan_in:
                raise ConfigError(f"rank={r} exceeds the {fan_in} input features of {name}; use at most that")
            if bat and (fan_in % r or fan_out % r):
                raise ConfigError(f"rank={r} with init_weights='bat' must divide both sides of {name} "
                                  f"({fan_out} × {fan_in}), which is cut into r × r blocks")
            if self.init_weights == "mini" and fan_out % self.mini_r:
                raise ConfigError(f"mini_r={self.mini_r} must divide the {fan_out} output features of {name}")
            if isinstance(module, MiSSLayer) and any((v == "bat") != bat for v in module.variant.values()):
                raise ConfigError(f"{name} holds MiSS adapters of another variant; a bat adapter cannot share a layer "
                                  "with balance or mini ones (HF PEFT computes every adapter of a layer with the "
                                  "first one's variant)")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, MiSSLayer) else MiSSLayer(module)
        layer.add(adapter_name, self.rank, init_weights=self.init_weights, mini_r=self.mini_r, dropout=self.dropout)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            miss_dropout=self.dropout,
            mini_r=self.mini_r,
            init_weights=self.init_weights,
            bias=self.bias,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> MiSS:
        unknown = hf_unknown_options(data, _HF_FIELDS, "MISS")
        init = data.get("init_weights", True)
        bias = data.get("bias", "none") or "none"
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 64),
            # Options HF PEFT ignores for the file's variant are dropped: they change nothing there either.
            dropout=0.0 if init == "bat" else data.get("miss_dropout", 0.0) or 0.0,
            mini_r=data.get("mini_r", 1) if init == "mini" else 1,
            init_weights=init,
            bias="MiSS_only" if bias.endswith("_only") else bias,  # HF PEFT reads any "…_only" alike
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
