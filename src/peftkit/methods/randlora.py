"""RandLoRA: full-rank updates from shared random low-rank bases.

Paper: Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025
(https://arxiv.org/abs/2502.00987).

One pair of frozen random bases is shared by every adapted layer of the model: A (r × 1 × d_max) and
B (D_max × n_max × r), d_max and D_max the smaller and larger side of (largest output, largest input). A layer
with d = min(in, out), D = max(in, out) uses n = ⌈d/r⌉ bases, so that the n·r random directions can span a
full-rank update, and trains only two small tensors, λ ∈ ℝ^{r×n} and γ ∈ ℝ^{n×d}::

    S[k·n + c, :] = λ[k, c] · A[k, 0, :d] ⊙ γ[c, :]          (r·n × d; γ is shared by the r rows of a basis)
    B̄[:, c·r + k] = B[:D, c, k]                              (D × n·r)
    ΔW = (α/r) · B̄ S           if in ≤ out, else its transpose
    x ↦ W₀x + ΔW dropout(x)                                 λ = 0, γ = 1/d at the start

Column i of B̄ meets row i of S, as in Hugging Face PEFT 0.21 (the paper's Σ_c B_c Λ_c A Γ_c up to a fixed
permutation of B's i.i.d. columns). The bases are drawn exactly as HF PEFT draws them from a ``torch.Generator``
seeded with ``projection_prng_key``: dense ones kaiming-uniform in bfloat16, sparse ones ternary (−1, 0, 1, with
P(±1) = 1/(2s) each, s = 3 or √d_max for ``very_sparse``), each divided by its standard deviation. So a file saved
without them (``save_projection=False``) loads identically in both libraries. As in HF PEFT, later RandLoRA adapters
reuse the first one's bases. Keys: ``…<layer>.randlora_lambda`` / ``randlora_gamma`` and, with
``save_projection``, the bases under ``…<layer>.randlora_A`` / ``randlora_B`` and ``base_model.randlora_A`` /
``base_model.randlora_B``. Linear-like layers only (``nn.Linear``, GPT-2's ``Conv1D``, quantized linears).
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
from peftkit.methods.vera import SharedProjection, _checked_bool, _checked_int, projection_tensors

BIAS_MODES = ("none", "all", "randlora_only")
Bases = tuple[torch.Tensor, torch.Tensor]


def num_bases(small: int, rank: int) -> int:
    """n = ⌈small / rank⌉: enough rank-r bases for a full-rank update of a layer whose smaller side is ``small``."""
    return -(-small // rank)


def _draw_dtype() -> torch.dtype:
    # HF PEFT draws dense bases in bfloat16 where accelerate reports it available (every CPU), else float16.
    return torch.float16 if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else torch.bfloat16


def dense_bases(rank: int, small: int, large: int, key: int) -> Bases:
    """A (rank, 1, small) and B (large, ⌈small/rank⌉, rank), kaiming-uniform from a generator seeded with ``key``
    (A first, then B one basis at a time), each divided by its std, as HF PEFT draws them; returned in fp32."""
    generator = torch.Generator(device="cpu").manual_seed(key)

    def draw(shape: tuple[int, int, int]) -> torch.Tensor:
        return nn.init.kaiming_uniform_(torch.empty(shape, dtype=_draw_dtype()), a=math.sqrt(5), generator=generator)

    basis_a = draw((rank, 1, small))
    basis_b = torch.cat([draw((large, 1, rank)) for _ in range(num_bases(small, rank))], dim=1)
    return (basis_a / basis_a.std()).float(), (basis_b / basis_b.std()).float()


def sparse_bases(rank: int, small: int, large: int, key: int, sparsity: float) -> Bases:
    """Ternary A and B (shapes as ``dense_bases``): −1 where a uniform draw is below 1/(2s), +1 above 1 − 1/(2s),
    else 0, divided by the std (https://cs-people.bu.edu/evimaria/cs565/kdd-rp.pdf)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    uniform_a = torch.rand((rank, 1, small), generator=generator)
    uniform_b = torch.rand((large, num_bases(small, rank), rank), generator=generator)
    edge = 1 / (2 * sparsity)

    def ternary(u: torch.Tensor) -> torch.Tensor:
        signs = (u > 1 - edge).float() - (u < edge).float()
        return signs / signs.std()

    return ternary(uniform_a), ternary(uniform_b)


class RandLoRALayer(AdapterLayer):
    """RandLoRA on a linear-like layer: ``base(x) + (α/r) · dropout(x) ΔWᵀ`` from slices of the shared bases.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not linear-like.
    """

    folds_into_weight = True
    adapter_containers = ("randlora_lambda", "randlora_gamma")

    def __init__(self, base_layer: nn.Module, randlora_A: SharedProjection, randlora_B: SharedProjection) -> None:
        kind = linear_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(f"RandLoRA cannot adapt a {type(base_layer).__name__}; supported layer "
                                        f"types: {LINEAR_KINDS.names()}")
        super().__init__(base_layer)
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.small, self.large = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.randlora_A = randlora_A
        self.randlora_B = randlora_B
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()
        self.dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    @property
    def kind(self) -> LinearKind:
        return cast(LinearKind, linear_kind(self.base_layer))  # looked up, not stored: kinds hold lambdas

    def add(self, name: str, rank: int, bases: Bases, *, alpha: float, dropout: float, init_weights: bool) -> None:
        """Add adapter ``name`` of rank ``rank`` on the shared ``bases`` = (A, B)."""
        self.randlora_A.add(name, bases[0])
        self.randlora_B.add(name, bases[1])
        n = num_bases(self.small, rank)
        # HF PEFT draws λ from the global generator whatever init_weights: the same stream is consumed here.
        lam, gamma = torch.randn(rank, n), torch.ones(n, self.small) / self.large
        if init_weights:
            lam.zero_()
            gamma.fill_(1 / self.small)  # HF PEFT: 1 / max(γ's shape), and n ≤ small
        weight = self.kind.weight(self.base_layer)
        if weight.dtype.is_floating_point:  # HF PEFT rounds them to the base dtype, then keeps fp32 over half precision
            lam, gamma = lam.to(weight.dtype), gamma.to(weight.dtype)
        self.randlora_lambda[name] = nn.Parameter(lam.to(weight.device, adapter_dtype(weight)))
        self.randlora_gamma[name] = nn.Parameter(gamma.to(weight.device, adapter_dtype(weight)))
        self.dropout[name] = dropout
        self.scaling[name] = alpha / rank

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.randlora_A.remove(name)  # shared: the other layers find it gone already
        self.randlora_B.remove(name)
        self.dropout.pop(name, None)
        self.scaling.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """λ and γ and, when the adapter saves its projections, the shared bases (HF PEFT writes them per layer)."""
        out = super().adapter_tensors(name)
        if out and self.randlora_A.persistent and name in self.randlora_A:
            out["randlora_A"], out["randlora_B"] = self.randlora_A[name], self.randlora_B[name]
        return out

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with ``x ↦ second(first(x))`` = x ΔWᵀ / (α/r), differentiable in λ and γ."""
        lam, gamma = self.randlora_lambda[name], self.randlora_gamma[name]
        n = lam.shape[1]
        basis_a = self.randlora_A[name][:, :, : self.small].to(lam.device, lam.dtype)
        basis_b = self.randlora_B[name][: self.large, :n, :].to(lam.device, lam.dtype).flatten(1)
        # λγ first, A last: autograd then keeps only the small λ, γ and A for the backward, not an r·n × d product.
        scaled = (lam.unsqueeze(-1) * gamma * basis_a).flatten(0, 1)
        if self.small == self.in_features:
            return scaled, basis_b
        return basis_b.T, scaled.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        names = self._applied()
        if not names:
            return result
        dtype = result.dtype
        for name in names:
            first, second = self._factors(name)
            h = x.to(first.dtype)
            if self.dropout[name] > 0:
                h = F.dropout(h, self.dropout[name], self.training)
            result = result + F.linear(F.linear(h, first), second) * self.scaling[name]
        return result.to(dtype)

    # -- merging: W ← W ± ΔW ---------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        with torch.no_grad():
            first, second = self._factors(name)
            delta: torch.Tensor = (second @ first) * self.scaling[name]
        return delta  # (out, in)

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        merge_deltas(self, names, safe, where)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        unmerge_deltas(self, names)


#: The fields every RandLoRA adapter on a model must share with the first: they fix the shared bases.
SHARED_FIELDS = ("projection_prng_key", "rank", "save_projection", "sparse", "very_sparse")


@register_method
@dataclass
class RandLoRA(AdaptedBiases, AdapterConfig):
    """RandLoRA: frozen shared random bases, trained per-layer diagonal scalings λ and γ.

    Attributes:
        rank: r, the rank of each random basis (HF PEFT: ``r``). A layer uses ⌈min(in, out)/r⌉ bases, so a *smaller*
            rank trains *more* parameters (λ: r × n, γ: n × min(in, out)).
        alpha: α; ΔW is scaled by α/r (HF PEFT: ``randlora_alpha``, typically 20·r). Lower it if training diverges.
        dropout: dropout probability on the adapter's input, in [0, 1) (HF PEFT: ``randlora_dropout``).
        projection_prng_key: seed of the generator the bases are drawn from (they are not trained).
        save_projection: write the bases into the adapter file; otherwise loading draws them again from the key.
        sparse: ternary bases (−1, 0, 1 with probabilities 1/6, 2/3, 1/6), scaled to unit std.
        very_sparse: sparser ternary bases, P(±1) = 1/(2√d) with d the smaller side of the largest target; takes
            precedence over ``sparse``, as in HF PEFT.
        init_weights: start from λ = 0 (the unchanged model) and γ = 1/min(in, out); ``False`` draws λ ~ N(0, 1) and
            sets γ = 1/max(in, out), as in HF PEFT (for tests).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"randlora_only"`` (the biases of
            the adapted layers).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a second RandLoRA adapter whose
            key, rank, ``save_projection``, ``sparse`` or ``very_sparse`` differs from the first's, or whose layers do
            not fit the shared bases.
        UnsupportedLayerError: in ``pk.apply``, a target that is not linear-like.
    """

    peft_type = "RANDLORA"
    bias_layer = RandLoRALayer
    bias_only = "randlora_only"

    rank: int = 32
    alpha: float = 640
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True
    bias: str = "none"
    #: The shared basis holders and bases ``resolve`` chose for the model being adapted.
    _shared: tuple[SharedProjection, SharedProjection, Bases] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _checked_int("rank", self.rank, 1)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key={self.projection_prng_key!r} must be an integer (a seed, e.g. 0)")
        for name in ("save_projection", "sparse", "very_sparse", "init_weights"):
            _checked_bool(name, getattr(self, name))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha={self.alpha!r} must be a finite number (e.g. 20 × rank = {20 * self.rank})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    def replace(self, **changes: Any) -> AdapterConfig:
        new = cast(RandLoRA, super().replace(**changes))
        new._shared = self._shared
        return new

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for this architecture, as HF PEFT's RandLoRA. Always a
        copy: the shared bases chosen for ``model`` are kept on it, not on the user's config."""
        if self.target_modules:
            return self.replace()
        return self.replace(target_modules=list(default_for(LORA_TARGETS, model, "RandLoRA", "target_modules=[...]")))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, RandLoRALayer):
            return True
        return not isinstance(module, AdapterLayer) and linear_kind(module) is not None

    def supported_layer_names(self) -> list[str]:
        return LINEAR_KINDS.names()

    def resolve(self, model: nn.Module) -> list[str]:
        targets = super().resolve(model)
        self._shared = self._shared_for(model, targets)
        return targets

    def draw_bases(self, small: int, large: int) -> Bases:
        """The bases for targets whose largest (out, in) have ``small`` and ``large`` as smaller and larger side."""
        if self.very_sparse:
            return sparse_bases(self.rank, small, large, self.projection_prng_key, math.sqrt(small))
        if self.sparse:
            return sparse_bases(self.rank, small, large, self.projection_prng_key, 3)
        return dense_bases(self.rank, small, large, self.projection_prng_key)

    def _shared_for(self, model: nn.Module, targets: list[str]) -> tuple[SharedProjection, SharedProjection, Bases]:
        """The model's bases if a RandLoRA adapter has them already (checked to agree and fit), else new ones sized,
        as in HF PEFT, by the largest output and the largest input among ``targets``."""
        modules = dict(model.named_modules())
        layers = [cast(nn.Module, getattr(modules[t], "base_layer", modules[t])) for t in targets]
        sizes = {t: (linear_kind(m).out_features(m), linear_kind(m).in_features(m))  # type: ignore[union-attr]
                 for t, m in zip(targets, layers, strict=True)}
        holder = next((m for m in model.modules() if isinstance(m, RandLoRALayer) and m.randlora_A.any() is not None),
                      None)
        if holder is None:
            out_max, in_max = (max(s[i] for s in sizes.values()) for i in (0, 1))
            basis_a, basis_b = self.draw_bases(min(out_max, in_max), max(out_max, in_max))
            weight = cast(LinearKind, linear_kind(layers[0])).weight(layers[0])  # a quantized layer's compute dtype
            if weight.dtype in (torch.float16, torch.bfloat16):  # HF PEFT rounds them to a half-precision base's dtype
                basis_a, basis_b = basis_a.to(weight.dtype).float(), basis_b.to(weight.dtype).float()
            return (SharedProjection(self.save_projection), SharedProjection(self.save_projection),
                    (basis_a.to(weight.device), basis_b.to(weight.device)))
        bases = (cast(torch.Tensor, holder.randlora_A.any()), cast(torch.Tensor, holder.randlora_B.any()))
        self._check_agrees(model)
        for target, (out_features, in_features) in sizes.items():
            small, large = min(out_features, in_features), max(out_features, in_features)
            if small > bases[0].shape[2] or large > bases[1].shape[0]:
                raise ConfigError(
                    f"{target} ({in_features} → {out_features}) does not fit the shared RandLoRA bases of the adapters "
                    f"already on the model (smaller side up to {bases[0].shape[2]}, larger side up to "
                    f"{bases[1].shape[0]}); as in HF PEFT, add first the adapter whose targets are largest")
        return holder.randlora_A, holder.randlora_B, bases

    def _check_agrees(self, model: nn.Module) -> None:
        """Raise ``ConfigError`` naming the first of :data:`SHARED_FIELDS` in which a RandLoRA adapter on ``model``
        differs from this config."""
        for name, other in get_state(model).configs.items():
            for attr in SHARED_FIELDS if isinstance(other, RandLoRA) else ():
                mine, theirs = getattr(self, attr), getattr(other, attr)
                if mine != theirs:
                    raise ConfigError(
                        f"{attr}={mine!r} differs from RandLoRA adapter {name!r}'s {theirs!r}; every RandLoRA adapter "
                        f"on a model shares its random bases (as in HF PEFT), so give this one {attr}={theirs!r} or "
                        "delete the others first")

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if self._shared is None:
            raise ConfigError("RandLoRA.transform needs the shared bases resolve(model) chooses; call resolve first")
        randlora_A, randlora_B, bases = self._shared
        layer = module if isinstance(module, RandLoRALayer) else RandLoRALayer(module, randlora_A, randlora_B)
        layer.add(adapter_name, self.rank, bases, alpha=float(self.alpha), dropout=float(self.dropout),
                  init_weights=self.init_weights)
        return layer

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The shared bases (with ``save_projection``) and trained biases, under HF PEFT's keys."""
        out = super().extra_tensors(model, name)
        if self.save_projection:
            out.update(projection_tensors(model, name, ("randlora_A", "randlora_B")))
        return out

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules",),
            r=self.rank,
            projection_prng_key=self.projection_prng_key,
            save_projection=self.save_projection,
            sparse=self.sparse,
            very_sparse=self.very_sparse,
            randlora_dropout=self.dropout,
            fan_in_fan_out=False,  # set by save_adapter when a target stores its weight transposed
            randlora_alpha=self.alpha,
            bias=self.bias,
            init_weights=self.init_weights,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> RandLoRA:
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            rank=int(data.get("r", 32)),
            alpha=data.get("randlora_alpha", 640),
            dropout=float(data.get("randlora_dropout", 0.0) or 0.0),
            projection_prng_key=int(data.get("projection_prng_key", 0)),
            save_projection=bool(data.get("save_projection", True)),
            sparse=bool(data.get("sparse", False)),
            very_sparse=bool(data.get("very_sparse", False)),
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type r target_modules exclude_modules projection_prng_key save_projection sparse very_sparse "
    "randlora_dropout fan_in_fan_out randlora_alpha bias modules_to_save init_weights layers_to_transform "
    "layers_pattern inference_mode".split()
)
