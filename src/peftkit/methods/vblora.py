"""VB-LoRA: LoRA factors assembled from a vector bank shared by every adapted layer.

Paper: Li, Han and Ji, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks", NeurIPS 2024
(https://arxiv.org/abs/2405.15179). Hugging Face PEFT 0.21.2's ``VBLORA`` is the reference for what follows.

One trained bank V ∈ ℝ^(n × b) of n = ``num_vectors`` vectors of length b = ``vector_length`` serves the whole
model. Each adapted layer (weight out × in, both multiples of b) trains logits, not factors: every b-long piece of
its rank-r factors is a mixture of the k = ``topk`` bank vectors its logits rank highest::

    piece(ℓ) = Σ_{j ∈ topk(ℓ)} softmax(ℓ_topk)_j · V_j          ℓ ∈ ℝⁿ, one logit vector per piece
    A = [piece(ℓ^A_{i,t})]  (r × in),   B = [piece(ℓ^B_{t,i})]ᵀ  (out × r)
    x ↦ W₀x + B A dropout(x)

``vblora_logits_A`` is (r, in/b, n) and ``vblora_logits_B`` (out/b, r, n); the bank is saved once per adapter, as
``base_model.vblora_vector_bank``. The bank starts U(−β, β) (β = ``init_vector_bank_bound``) and the logits
N(0, σ²) (σ = ``init_logits_std``), drawn from torch's global generator in HF PEFT's order: for every target, a new
bank, then its logits A and B; the last bank drawn is the one kept. With ``save_only_topk_weights`` the file holds,
per logit vector, only the indices of its top k and the first k − 1 of their softmax weights
(``…vblora_logits_A_topk_indices`` / ``_topk_weights``); loading puts log(weights) back at those indices and −∞
elsewhere, which gives the same factors but cannot be trained further (refused in training mode, as in HF PEFT).
``nn.Linear`` and GPT-2's ``Conv1D`` layers (not quantized ones); merging adds B·A to the weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, LINEAR_KINDS, LinearKind, linear_kind, register_method
from peftkit.errors import AdapterStateError, ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import ADALORA_TARGETS, default_for
from peftkit.methods.lora_layers import adapter_dtype

#: model_type → VB-LoRA's default target_modules: AdaLoRA's, but query and value on RoBERTa (HF PEFT's mapping).
VBLORA_TARGETS: dict[str, tuple[str, ...]] = {**ADALORA_TARGETS, "roberta": ("query", "value")}
BIAS_MODES = ("none", "all", "vblora_only")
#: The file's logits keys (``…vblora_logits_A``) and their top-k forms' suffixes.
LOGITS = (".vblora_logits_A", ".vblora_logits_B")
INDICES, WEIGHTS = "_topk_indices", "_topk_weights"


def _supported(module: nn.Module) -> bool:
    """Linear-like and not quantized: B·A is added to a float weight."""
    return linear_kind(module) is not None and DEQUANTIZERS.lookup(type(module)) is None


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Each logit vector (last dim, n) as the softmax-weighted sum of the bank rows its top ``topk`` entries pick:
    (..., n) → (..., vector_length)."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The narrowest integer dtype HF PEFT stores top-k indices of a bank of ``num_vectors`` in."""
    for dtype, bound in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < bound:
            return dtype
    return torch.int64


class VBLoRALayer(DeltaLayer):
    """VB-LoRA on ``nn.Linear`` or GPT-2's ``Conv1D``: ``base(x) + B A dropout(x)``, A and B mixed from the bank.

    Args:
        base_layer: the wrapped layer.
        bank: the model's shared bank, adapter name → (num_vectors, vector_length); the same module in every layer.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another (or a quantized) type.
    """

    adapter_containers = ("vblora_logits_A", "vblora_logits_B")

    def __init__(self, base_layer: nn.Module, bank: nn.ParameterDict) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"VBLoRA cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear "
                                        "and GPT-2's Conv1D (as HF PEFT 0.21.2)")
        super().__init__(base_layer)
        kind = self.kind
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.vblora_vector_bank = bank  # HF PEFT's attribute name, so the model's parameter names match its own
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()
        self.topk: dict[str, int] = {}
        self.dropout: dict[str, float] = {}

    def add(self, name: str, config: VBLoRA) -> None:
        """Add adapter ``name``: draw a bank (kept if this is the last target, as in HF PEFT) and the logits."""
        weight = self.kind.weight(self.base_layer)
        bound = config.init_vector_bank_bound
        bank = torch.zeros(config.num_vectors, config.vector_length).uniform_(-bound, bound)
        length = config.vector_length
        logits_a = torch.zeros(config.rank, self.in_features // length, config.num_vectors)
        logits_b = torch.zeros(self.out_features // length, config.rank, config.num_vectors)
        nn.init.normal_(logits_a, 0, config.init_logits_std)
        nn.init.normal_(logits_b, 0, config.init_logits_std)
        self.vblora_vector_bank[name] = nn.Parameter(_as_adapter(bank, weight))
        self.vblora_logits_A[name] = nn.Parameter(_as_adapter(logits_a, weight))
        self.vblora_logits_B[name] = nn.Parameter(_as_adapter(logits_b, weight))
        self.topk[name] = config.topk
        self.dropout[name] = config.dropout

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The logits and, shared with the other layers, the adapter's bank."""
        yield from super().adapter_parameters(name)
        if self.has_adapter(name) and name in self.vblora_vector_bank:
            yield self.vblora_vector_bank[name]

    def parameters_finite(self, name: str) -> bool:
        """No NaN and no +∞ anywhere; −∞ logits (a top-k file's, outside the top k) are never picked, so allowed."""
        return all(not bool(p.isnan().any() or (p == math.inf).any()) for p in self.adapter_parameters(name)) \
            and bool(self.vblora_vector_bank[name].isfinite().all())

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.vblora_vector_bank:  # shared: the other layers find it gone already
            self.vblora_vector_bank.pop(name)
        self.topk.pop(name, None)
        self.dropout.pop(name, None)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r × in) and B (out × r), differentiable.

        Raises:
            AdapterStateError: in training mode, logits loaded from a top-k-only file (−∞ outside the top k).
        """
        logits_a, logits_b = self.vblora_logits_A[name], self.vblora_logits_B[name]
        if self.training and bool(logits_a[0, 0].isinf().any()):
            raise AdapterStateError(
                f"VBLoRA adapter {name!r} was loaded from a file saved with save_only_topk_weights=True: its logits "
                "keep only the top k of each vector, so it can be used and merged but not trained. Train from a file "
                "saved with save_only_topk_weights=False, or call model.eval()")
        bank = self.vblora_vector_bank[name].to(logits_a.device)
        topk = self.topk[name]
        a = mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)  # (r, in/b, b) → (r, in)
        b = mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])  # (out/b, r, b) → (out, r)
        return a, b

    def _delta(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return b @ a

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)``, in HF PEFT's order (the factors, not x ΔWᵀ)."""
        a, b = self.factors(name)
        h = x.to(a.dtype)
        if self.dropout[name] > 0:
            h = F.dropout(h, self.dropout[name], self.training)
        return F.linear(F.linear(h, a), b)


def _as_adapter(tensor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A new adapter tensor as HF PEFT places it: rounded to a float base's dtype, then kept in fp32 over half
    precision, on the base's device."""
    if weight.dtype.is_floating_point:
        tensor = tensor.to(weight.dtype)
    return tensor.to(weight.device, adapter_dtype(weight))


def _check_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def _check_float(key: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a finite number >= 0 (e.g. {example})")


#: ``adapter_config.json`` fields of HF PEFT's VBLoRAConfig that select or compute something.
_HF_FIELDS = frozenset(
    "r num_vectors vector_length topk target_modules exclude_modules save_only_topk_weights vblora_dropout "
    "fan_in_fan_out bias modules_to_save init_vector_bank_bound init_logits_std layers_to_transform "
    "layers_pattern".split())


@register_method
@dataclass
class VBLoRA(AdaptedBiases, AdapterConfig):
    """VB-LoRA: per-layer top-k logits over one trained vector bank (HF PEFT's ``VBLoRAConfig``).

    Attributes:
        rank: r, the rank of each layer's B·A (HF PEFT: ``r``).
        num_vectors: n, the vectors in the bank (use more for larger models).
        vector_length: b, the length of each vector; it must divide the input and output size of every adapted
            layer. HF PEFT's default, 256, suits large models.
        topk: k, the bank vectors mixed into each piece of A and B (at most ``num_vectors``; the paper uses 2).
        dropout: dropout probability on the adapter's input, in [0, 1) (HF PEFT: ``vblora_dropout``).
        save_only_topk_weights: write each logit vector's top-k indices and weights instead of the logits: a far
            smaller file, which reproduces the outputs and merges but cannot be trained further.
        init_vector_bank_bound: β, the bank starts U(−β, β) (not zero, which would give no gradient).
        init_logits_std: σ, the logits start N(0, σ²).
        fan_in_fan_out: HF PEFT's field, written to ``adapter_config.json``; peftkit reads the weight's orientation
            from the layer type (``Conv1D`` stores it transposed), which is what HF PEFT ends up doing.
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"vblora_only"`` (the biases
            of the adapted layers).

    Raises:
        ConfigError: a field out of range (named, with its value); in ``pk.apply``, a target whose sizes are not
            multiples of ``vector_length``.
        UnsupportedLayerError: in ``pk.apply``, a target that is not ``nn.Linear`` or ``Conv1D``.
    """

    peft_type = "VBLORA"
    bias_layer = VBLoRALayer
    bias_only = "vblora_only"

    rank: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    dropout: float = 0.0
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    #: The bank module ``resolve`` chose for the model being adapted: the one its VB-LoRA layers share, or a new one.
    _bank: nn.ParameterDict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("rank", "num_vectors", "vector_length", "topk"):
            _check_int(key, getattr(self, key))
        if self.topk > self.num_vectors:
            raise ConfigError(f"topk={self.topk} must be at most num_vectors={self.num_vectors} (the paper uses 2)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        _check_float("init_vector_bank_bound", self.init_vector_bank_bound, "0.02")
        _check_float("init_logits_std", self.init_logits_std, "0.1")
        for key in ("save_only_topk_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be True or False")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def replace(self, **changes: Any) -> AdapterConfig:
        new = cast(VBLoRA, super().replace(**changes))
        new._bank = self._bank
        return new

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's VB-LoRA adapts on this architecture. Always a copy: the
        bank chosen for ``model`` is kept on it, not on the user's config."""
        if self.target_modules:
            return self.replace()
        return self.replace(target_modules=list(default_for(VBLORA_TARGETS, model, "VBLoRA", "target_modules=[...]")))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second VB-LoRA adapter only
            return isinstance(module, VBLoRALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return [n for n in LINEAR_KINDS.names() if n in ("Linear", "Conv1D")]

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to split into vectors before the model changes; and the model's bank.

        Raises:
            ConfigError: a target's input or output size is not a multiple of ``vector_length``.
        """
        targets = super().resolve(model)
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, VBLoRALayer) else module
            kind = cast(LinearKind, linear_kind(base))  # resolve_targets kept supported modules only
            sizes = (kind.in_features(base), kind.out_features(base))
            if sizes[0] % self.vector_length or sizes[1] % self.vector_length:
                common = math.gcd(*sizes)
                raise ConfigError(
                    f"vector_length={self.vector_length} must divide the input size {sizes[0]} and output size "
                    f"{sizes[1]} of {name}; choose a divisor of {common} that also divides the other targets' sizes")
        layer = next((m for m in model.modules() if isinstance(m, VBLoRALayer)), None)
        self._bank = layer.vblora_vector_bank if layer is not None else nn.ParameterDict()
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if self._bank is None:
            raise ConfigError("VBLoRA.transform needs the bank resolve(model) chooses; call resolve first")
        layer = module if isinstance(module, VBLoRALayer) else VBLoRALayer(module, self._bank)
        layer.add(adapter_name, self)
        return layer

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The bank under HF PEFT's model-level key, and the trained biases."""
        out = super().extra_tensors(model, name)
        layer = next((m for m in model.modules() if isinstance(m, VBLoRALayer) and m.has_adapter(name)), None)
        if layer is not None:
            out["base_model.vblora_vector_bank"] = layer.vblora_vector_bank[name]
        return out

    # -- the file's tensors: logits, or their top k ------------------------------------------------
    def file_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` as the file holds it: with ``save_only_topk_weights``, each logits tensor as the indices of its
        top k (the narrowest integer dtype) and the first k − 1 of their softmax weights."""
        if not self.save_only_topk_weights:
            return state
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not key.endswith(LOGITS):
                out[key] = value
                continue
            top, indices = value.detach().topk(self.topk)
            out[key + INDICES] = indices.to(index_dtype(self.num_vectors))
            out[key + WEIGHTS] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def tensors_from_file(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logits back from a top-k file (log-weights at the indices, −∞ elsewhere); other files as they are."""
        out = dict(weights)
        for key in [k for k in weights if k.endswith(INDICES)]:
            base = key.removesuffix(INDICES)
            kept = out.pop(base + WEIGHTS)
            indices = out.pop(key).long()
            top = torch.log(torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], dim=-1))
            logits = torch.full((*top.shape[:-1], self.num_vectors), float("-inf"), dtype=top.dtype, device=top.device)
            out[base] = logits.scatter(-1, indices, top)
        return out

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            r=self.rank,
            num_vectors=self.num_vectors,
            vector_length=self.vector_length,
            topk=self.topk,
            save_only_topk_weights=self.save_only_topk_weights,
            vblora_dropout=self.dropout,
            fan_in_fan_out=self.fan_in_fan_out,  # set by save_adapter when a target stores its weight transposed
            bias=self.bias,
            init_vector_bank_bound=self.init_vector_bank_bound,
            init_logits_std=self.init_logits_std,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> VBLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS, "VBLoRA")
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=data.get("r", 4),
            num_vectors=data.get("num_vectors", 256),
            vector_length=data.get("vector_length", 256),
            topk=data.get("topk", 2),
            dropout=data.get("vblora_dropout", 0.0) or 0.0,
            save_only_topk_weights=bool(data.get("save_only_topk_weights", False)),
            init_vector_bank_bound=data.get("init_vector_bank_bound", 0.02),
            init_logits_std=data.get("init_logits_std", 0.1),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )
