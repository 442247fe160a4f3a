"""VeRA: vector-based random matrix adaptation.

Paper: Kopiczko, Blankevoort and Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024
(https://arxiv.org/abs/2310.11454).

One pair of frozen random matrices A (r × in_max) and B (out_max × r) is shared by every adapted layer
of the model; each layer trains only two vectors, λ_d ∈ ℝ^r and λ_b ∈ ℝ^out, and uses the top-left slices
A[:, :in] and B[:out, :] of the shared matrices::

    x ↦ W₀x + Λ_b B Λ_d A dropout(x)            Λ = diag(λ),  λ_b = 0 and λ_d = d_initial at the start

A and B are drawn exactly as Hugging Face PEFT 0.21 draws them (kaiming-uniform from a ``torch.Generator``
seeded with ``projection_prng_key``, A first), so a file saved without them (``save_projection=False``)
loads identically in both libraries. As in HF PEFT, later VeRA adapters reuse the first one's matrices:
they must have the same key, rank and ``save_projection``, and their layers must fit the matrices. File
keys follow HF PEFT: ``…<layer>.vera_lambda_b`` / ``vera_lambda_d`` and, with ``save_projection``,
``base_model.vera_A`` / ``base_model.vera_B``. Linear-like layers only (``nn.Linear``, GPT-2's ``Conv1D``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LINEAR_KINDS, LinearKind, linear_kind, register_method
from peftkit.core.state import get_state
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields
from peftkit.methods.additive import merge_deltas, unmerge_deltas
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, default_for
from peftkit.methods.lora_layers import adapter_dtype

#: model_type → VeRA's default target_modules: LoRA's, except Phi (HF PEFT's VeRA mapping).
VERA_TARGETS: dict[str, tuple[str, ...]] = {**LORA_TARGETS, "phi": ("q_proj", "v_proj")}
BIAS_MODES = ("none", "all", "vera_only")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3·√2/√fan_in, fan_in = ``shape[1]``, drawn from ``generator``.

    The bound is computed in HF PEFT's order of operations (``_kaiming_init``): a bound one ulp off would
    give other matrices.
    """
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(rank: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A, B) of shapes (rank, in_features) and (out_features, rank) for PRNG key ``key``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((rank, in_features), generator)
    vera_b = kaiming_uniform((out_features, rank), generator)
    return vera_a, vera_b


class SharedProjection(nn.Module):
    """One random matrix, registered once per adapter name (the same tensor each time, as HF PEFT's
    ``BufferDict``), so the model's state dict has HF PEFT's keys (``…q_proj.vera_A.default``). Every VeRA
    layer of a model holds the same instance; ``persistent`` is the adapters' ``save_projection``."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.persistent = persistent

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return cast(torch.Tensor, self._buffers[name])

    def add(self, name: str, matrix: torch.Tensor) -> None:
        if name not in self._buffers:
            self.register_buffer(name, matrix, persistent=self.persistent)

    def remove(self, name: str) -> None:
        self._buffers.pop(name, None)
        self._non_persistent_buffers_set.discard(name)

    def any(self) -> torch.Tensor | None:
        """The matrix (every name holds the same), or ``None`` once every adapter is gone."""
        return next((cast(torch.Tensor, b) for b in self._buffers.values()), None)


def projection_tensors(model: nn.Module, name: str, attrs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s shared matrices under HF PEFT's model-level keys (``base_model.<attr>``), from the first layer
    whose ``attrs`` are :class:`SharedProjection` s holding ``name``."""
    for module in model.modules():
        shared = [getattr(module, attr, None) for attr in attrs]
        if all(isinstance(s, SharedProjection) and name in s for s in shared):
            return {f"base_model.{a}": cast(SharedProjection, s)[name] for a, s in zip(attrs, shared, strict=True)}
    return {}


class VeRALayer(AdapterLayer):
    """VeRA on a linear-like layer: ``base(x) + λ_b ⊙ B[:out] (λ_d ⊙ A[:, :in] dropout(x))``.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not linear-like.
    """

    folds_into_weight = True
    adapter_containers = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, vera_A: SharedProjection, vera_B: SharedProjection) -> None:
        super().__init__(base_layer)
        kind = linear_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(
                f"VeRA cannot adapt a {type(base_layer).__name__}; supported layer types: {LINEAR_KINDS.names()}"
            )
        self.in_features = kind.in_features(base_layer)
        self.out_features = kind.out_features(base_layer)
        self.vera_A = vera_A
        self.vera_B = vera_B
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.dropout: dict[str, float] = {}

    @property
    def kind(self) -> LinearKind:
        # Looked up, not stored: the layer stays picklable (kinds hold lambdas).
        return cast(LinearKind, linear_kind(self.base_layer))

    def add(self, name: str, rank: int, shared: tuple[torch.Tensor, torch.Tensor], *, dropout: float = 0.0,
            d_initial: float = 0.1, init_weights: bool = True) -> None:
        """Add adapter ``name`` of rank ``rank`` on the shared matrices ``shared`` = (A, B)."""
        weight = self.kind.weight(self.base_layer)
        self.vera_A.add(name, shared[0])
        self.vera_B.add(name, shared[1])
        # HF PEFT draws λ_d from the global generator before setting it: the same stream is consumed here.
        lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(rank)
        if init_weights:
            lambda_b.zero_()
            lambda_d.fill_(d_initial)
        dtype = adapter_dtype(weight)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(weight.device, dtype))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(weight.device, dtype))
        self.dropout[name] = dropout

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.vera_A.remove(name)  # shared: the other layers find it gone already
        self.vera_B.remove(name)
        self.dropout.pop(name, None)

    def _slices(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices A[:, :in] and B[:out, :] of adapter ``name``'s shared matrices, as ``like``."""
        vera_a = self.vera_A[name][:, : self.in_features]
        vera_b = self.vera_B[name][: self.out_features, :]
        return vera_a.to(like.device, like.dtype), vera_b.to(like.device, like.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        dtype = result.dtype
        for name in names:
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            vera_a, vera_b = self._slices(name, lambda_d)
            h = x.to(lambda_d.dtype)
            if self.dropout[name] > 0:
                h = F.dropout(h, self.dropout[name], self.training)
            result = result + lambda_b * F.linear(lambda_d * F.linear(h, vera_a), vera_b)
        return result.to(dtype)

    # -- merging: W ← W ± Λ_b B Λ_d A ---------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        lambda_b, lambda_d = self.vera_lambda_b[name].detach(), self.vera_lambda_d[name].detach()
        vera_a, vera_b = self._slices(name, lambda_d)
        delta: torch.Tensor = (lambda_b.unsqueeze(-1) * vera_b) @ (lambda_d.unsqueeze(-1) * vera_a)
        return delta  # (out, in)

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names)


def _checked_int(field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field_name}={value!r} must be an integer >= {minimum}")


def _checked_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} must be True or False")


@register_method
@dataclass
class VeRA(AdaptedBiases, AdapterConfig):
    """VeRA: frozen shared random matrices, trained per-layer scaling vectors.

    Attributes:
        rank: the rows of A and columns of B (HF PEFT: ``r``); VeRA needs far higher ranks than LoRA.
        projection_prng_key: seed of the generator A and B are drawn from (they are not trained).
        save_projection: write A and B into the adapter file; otherwise loading draws them again from the key.
        dropout: dropout probability on the adapter's input, in [0, 1) (HF PEFT: ``vera_dropout``).
        d_initial: the initial value of every λ_d entry (λ_b starts at zero, so the output starts unchanged).
        init_weights: ``False`` starts from λ_b = 1 and λ_d ~ N(0, 1) instead, as in HF PEFT (for tests).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"vera_only"`` (the biases
            of the adapted layers).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a second VeRA adapter whose key,
            rank or ``save_projection`` differs from the first's, or whose layers do not fit the shared matrices.
        UnsupportedLayerError: in ``pk.apply``, a target that is not linear-like.
    """

    peft_type = "VERA"
    bias_layer = VeRALayer
    bias_only = "vera_only"

    rank: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    bias: str = "none"
    #: The shared projection modules and matrices ``resolve`` chose for the model being adapted.
    _shared: tuple[SharedProjection, SharedProjection, torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key={self.projection_prng_key!r} must be an integer (a seed, e.g. 0)")
        _checked_bool("save_projection", self.save_projection)
        _checked_bool("init_weights", self.init_weights)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial={self.d_initial!r} must be a finite number (e.g. 0.1)")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def replace(self, **changes: Any) -> AdapterConfig:
        new = cast(VeRA, super().replace(**changes))
        new._shared = self._shared
        return new

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's VeRA adapts on this architecture. Always a copy: the
        shared matrices chosen for ``model`` are kept on it, not on the user's config."""
        if self.target_modules:
            return self.replace()
        return self.replace(target_modules=list(default_for(VERA_TARGETS, model, "VeRA", "target_modules=[...]")))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, VeRALayer):
            return True
        return not isinstance(module, AdapterLayer) and linear_kind(module) is not None

    def supported_layer_names(self) -> list[str]:
        return LINEAR_KINDS.names()

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        self._shared = self._shared_for(model, targets)
        return targets

    def _shared_for(self, model: nn.Module, targets: list[str]
                    ) -> tuple[SharedProjection, SharedProjection, torch.Tensor, torch.Tensor]:
        """The model's shared matrices if a VeRA adapter has them already (checked as HF PEFT checks them),
        else new ones sized for the largest of ``targets``."""
        modules = dict(model.named_modules())
        sizes = {t: _features(modules[t]) for t in targets}
        holder = next((m for m in model.modules() if isinstance(m, VeRALayer) and m.vera_A.any() is not None), None)
        if holder is None:
            vera_a, vera_b = projections(self.rank, max(i for i, _ in sizes.values()),
                                         max(o for _, o in sizes.values()), self.projection_prng_key)
            weight = _raw_weight(modules[targets[0]])
            if weight.dtype in (torch.float16, torch.bfloat16):  # HF PEFT rounds them to a half-precision base's dtype
                vera_a, vera_b = vera_a.to(weight.dtype).float(), vera_b.to(weight.dtype).float()
            return (SharedProjection(self.save_projection), SharedProjection(self.save_projection),
                    vera_a.to(weight.device), vera_b.to(weight.device))
        vera_a, vera_b = cast(torch.Tensor, holder.vera_A.any()), cast(torch.Tensor, holder.vera_B.any())
        for name, other in get_state(model).configs.items():
            if not isinstance(other, VeRA):
                continue
            for attr in ("projection_prng_key", "rank", "save_projection"):
                if getattr(other, attr) != getattr(self, attr):
                    raise ConfigError(
                        f"{attr}={getattr(self, attr)!r} differs from VeRA adapter {name!r}'s "
                        f"{getattr(other, attr)!r}; every VeRA adapter on a model shares its random matrices (as in "
                        f"HF PEFT), so give this one {attr}={getattr(other, attr)!r} or delete the others first"
                    )
        for target, (in_features, out_features) in sizes.items():
            if in_features > vera_a.shape[1] or out_features > vera_b.shape[0]:
                raise ConfigError(
                    f"{target} ({in_features} → {out_features}) does not fit the shared VeRA matrices of the "
                    f"adapters already on the model (inputs up to {vera_a.shape[1]}, outputs up to "
                    f"{vera_b.shape[0]}); as in HF PEFT, add first the adapter whose targets are largest"
                )
        return holder.vera_A, holder.vera_B, vera_a, vera_b

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if self._shared is None:
            raise ConfigError("VeRA.transform needs the shared matrices resolve(model) chooses; call resolve first")
        vera_A, vera_B, vera_a, vera_b = self._shared
        layer = module if isinstance(module, VeRALayer) else VeRALayer(module, vera_A, vera_B)
        layer.add(adapter_name, self.rank, (vera_a, vera_b), dropout=self.dropout, d_initial=self.d_initial,
                  init_weights=self.init_weights)
        return layer

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The shared matrices (with ``save_projection``) and trained biases, under HF PEFT's keys."""
        out = super().extra_tensors(model, name)
        if self.save_projection:
            out.update(projection_tensors(model, name, ("vera_A", "vera_B")))
        return out

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules",),
            r=self.rank,
            projection_prng_key=self.projection_prng_key,
            save_projection=self.save_projection,
            vera_dropout=self.dropout,
            d_initial=self.d_initial,
            fan_in_fan_out=False,  # set by save_adapter when a target stores its weight transposed
            bias=self.bias,
            init_weights=self.init_weights,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> VeRA:
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=int(data.get("r", 256)),
            projection_prng_key=int(data.get("projection_prng_key", 0)),
            save_projection=bool(data.get("save_projection", True)),
            dropout=float(data.get("vera_dropout", 0.0) or 0.0),
            d_initial=float(data.get("d_initial", 0.1)),
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type r target_modules exclude_modules projection_prng_key save_projection vera_dropout d_initial "
    "fan_in_fan_out bias modules_to_save init_weights layers_to_transform layers_pattern inference_mode".split()
)


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module or of the one a VeRA layer wraps."""
    base = module.base_layer if isinstance(module, VeRALayer) else module
    kind = cast(LinearKind, linear_kind(base))
    return kind.in_features(base), kind.out_features(base)


def _raw_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor as the layer stores it (a quantized layer's packed data)."""
    base = module.base_layer if isinstance(module, VeRALayer) else module
    return cast(torch.Tensor, base.weight)
