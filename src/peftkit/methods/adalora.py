"""AdaLoRA: LoRA in SVD form whose ranks are re-allocated during training by importance.

Paper: Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(https://arxiv.org/abs/2303.10512). Follows Hugging Face PEFT 0.21's ``ADALORA`` exactly.

For a frozen W₀ and P (out × r), Λ = diag(λ) (λ ∈ ℝ^r, stored as E), Q (r × in)::

    x ↦ W₀x + α / (r₀ + 10⁻⁵) · P Λ Q x              (r₀ = the initial rank, kept after pruning)

Importance of every entry w (after ``backward``): I = |w ∂L/∂w|, smoothed Ī ← β₁Ī + (1−β₁)I and its
uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|; s(w) = Ī·Ū. Triplet i scores S_i = s(λ_i) + mean_j s(Q_ij) +
mean_j s(P_ji). The total budget b(t) (number of kept triplets) follows the cubic schedule

    b(t) = b₀                                   t ≤ t_init
         = b_T + (b₀ − b_T)(1 − (t−t_init)/(T−t_final−t_init))³    every ΔT steps in between
         = b_T = target_rank · #layers           t > T − t_final

and every λ_i whose score is among the lowest b₀ − b(t) is set to zero. An orthogonality penalty
R = mean over factors of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F is added to the model's loss (weight
``orth_reg_weight``) by a forward hook, in training mode only (HF PEFT adds it in evaluation too). Call
``pk.adalora_step(model, step)`` after ``backward()`` and before ``zero_grad()``. The final masks are saved as
``rank_pattern``; the file holds only kept triplets.
The allocator's state (EMAs, masks) travels with training checkpoints (:mod:`peftkit.methods.adalora_state`),
so a resumed run allocates exactly as an uninterrupted one.
Layers: :class:`SVDLinear` (linear-like) here, :class:`~peftkit.methods.adalora_conv.SVDConv2d` (``nn.Conv2d``,
its kernel flattened to out × in·kH·kW, so the allocator treats both alike) in :mod:`peftkit.methods.adalora_conv`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.registry import LINEAR_KINDS, LinearKind, linear_kind, register_method
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import AdapterStateError, ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_targets, hf_modules_to_save, hf_resolve, hf_targets
from peftkit.methods.adalora_state import (
    _ALLOCATORS,
    adalora_adapters,
    allocator_state_dict,
    allocator_states,
    check_allocator_state,
    load_allocator_state,
    load_allocator_states,
)
from peftkit.methods.default_targets import ADALORA_TARGETS, with_default_targets
from peftkit.methods.lora import BIAS_MODES, bias_modules, hf_module_paths, train_biases
from peftkit.methods.lora_layers import LoRALayer, adapter_dtype

# The checkpoint-state functions live in adalora_state; importing them from here keeps working.
__all__ = ["AdaLoRA", "RankAllocator", "SVDLinear", "adalora_adapters", "adalora_step", "allocator_state_dict",
           "allocator_states", "check_allocator_state", "load_allocator_state", "load_allocator_states",
           "orthogonality_loss", "svd_layer_type"]

_EPS = 1e-5  # HF PEFT's guard in α / (r₀ + ε)


class SVDLinear(LoRALayer):
    """AdaLoRA on a linear-like layer: ``base(x) + α/(r₀+ε) · ((dropout(x) Qᵀ ⊙ λ) Pᵀ)``."""

    adapter_containers = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = self._factor_features(base_layer)
        self.lora_A = nn.ParameterDict()  # Q, (r, in)
        self.lora_B = nn.ParameterDict()  # P, (out, r)
        self.lora_E = nn.ParameterDict()  # λ, (r, 1)
        self.ranknum = nn.ParameterDict()  # r₀, frozen (a parameter, as in HF PEFT, so counts agree)
        #: Triplets kept by the last allocation (``None``: all); applied when saving.
        self.rank_mask: dict[str, torch.Tensor] = {}

    @staticmethod
    def _factor_features(base_layer: nn.Module) -> tuple[int, int]:
        """(columns of Q, rows of P) for ``base_layer``; raises ConfigError if it is not linear-like."""
        kind = linear_kind(base_layer)
        if kind is None:
            raise ConfigError(f"{type(base_layer).__name__} is not a linear-like layer")
        return kind.in_features(base_layer), kind.out_features(base_layer)

    def add(self, name: str, rank: int, initial_rank: int, alpha: float, dropout: float) -> None:
        weight = self._base_weight()
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Parameter(torch.randn(rank, self.in_features, **factory) * 0.02)
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, rank, **factory) * 0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(rank, 1, **factory))  # λ = 0: no change at first
        self.ranknum[name] = nn.Parameter(torch.tensor([float(initial_rank)], **factory), requires_grad=False)
        self.rank[name] = rank
        self.scaling[name] = alpha if alpha > 0 else float(initial_rank)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position[name] = "pre"

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.rank_mask.pop(name, None)
        if name in self.ranknum:
            del self.ranknum[name]

    def factor(self, name: str) -> torch.Tensor:
        """α / (r₀ + ε)."""
        return cast(torch.Tensor, self.scaling[name] / (self.ranknum[name] + _EPS))

    def delta_weight(self, name: str) -> torch.Tensor:
        P, Q, E = (cast(torch.Tensor, t[name]) for t in (self.lora_B, self.lora_A, self.lora_E))
        return P @ (Q * E) * self.factor(name)

    def _kind(self) -> LinearKind:
        kind = linear_kind(self.base_layer)
        if kind is None:  # only if someone swapped the base layer after wrapping
            raise ConfigError(f"{type(self.base_layer).__name__} is not a linear-like layer")
        return kind

    def _base_weight(self) -> torch.Tensor:
        return self._kind().weight(self.base_layer)

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        return self._kind().set_weight(self.base_layer, weight)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = super().adapter_tensors(name)
        mask = self.rank_mask.get(name)
        if mask is None or bool(mask.all()):
            return tensors
        # Only the kept triplets go to disk (HF PEFT's resize_state_dict_by_rank_pattern).
        return {"lora_A": tensors["lora_A"][mask], "lora_E": tensors["lora_E"][mask],
                "lora_B": tensors["lora_B"][:, mask]}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        for name in self._applied():
            A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            # As HF PEFT's in-place add: the update joins the base output in its own (wider) dtype, then rounds.
            result = (result + (h @ (A * E).T @ B.T) * self.factor(name)).to(result.dtype)
        return result


def svd_layer_type(module: nn.Module) -> type[SVDLinear] | None:
    """The AdaLoRA layer class that wraps ``module`` (``None``: AdaLoRA cannot adapt it)."""
    from peftkit.methods.adalora_conv import SVDConv2d  # adalora_conv subclasses SVDLinear, defined here

    if isinstance(module, nn.Conv2d):
        return SVDConv2d
    return SVDLinear if linear_kind(module) is not None else None


def _svd_layers(model: nn.Module, name: str) -> Iterator[tuple[str, SVDLinear]]:
    for qualname, layer in adapter_layers(model):
        if isinstance(layer, SVDLinear) and layer.has_adapter(name):
            yield qualname, layer


def orthogonality_loss(model: nn.Module, name: str) -> torch.Tensor:
    """R = mean over the adapter's P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
    terms = []
    for _, layer in _svd_layers(model, name):
        A, B = layer.lora_A[name], layer.lora_B[name]
        for cov in (A @ A.T, B.T @ B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class RankAllocator:
    """The importance EMAs and budget schedule of one AdaLoRA adapter.

    EMAs are keyed ``<layer qualname>.<lora_A|lora_B|lora_E>`` so that :meth:`state_dict` carries over to a
    rebuilt model (bit-exact resume); the kept-triplet masks it produces live on the layers and the config.
    """

    def __init__(self, model: nn.Module, name: str, config: AdaLoRA) -> None:
        self.name, self.config = name, config
        self.layers = dict(_svd_layers(model, name))
        self.initial_budget = sum(layer.rank[name] for layer in self.layers.values())
        self.target_budget = config.target_rank * len(self.layers)
        self.ema_ipt: dict[str, torch.Tensor] = {}
        self.ema_unc: dict[str, torch.Tensor] = {}

    def factors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(``<qualname>.<container>``, parameter) for every P, Q and λ of the adapter."""
        for qualname, layer in self.layers.items():
            for container in SVDLinear.adapter_containers:
                yield f"{qualname}.{container}", getattr(layer, container)[self.name]

    def budget(self, step: int) -> tuple[int, bool]:
        """(b(t), whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_importance(self, model: nn.Module) -> None:
        """Fold the factors' current gradients into the importance EMAs.

        Raises:
            AdapterStateError: no factor has a gradient (called before ``backward()`` or after ``zero_grad()``),
                which would leave the importances, and so the ranks kept, unrelated to the loss.
        """
        if all(p.grad is None for _, p in self.factors()):
            raise AdapterStateError(
                f"pk.adalora_step found no gradient on the factors of AdaLoRA adapter {self.name!r}: call it after "
                "loss.backward() (and optimizer.step()) and before optimizer.zero_grad()"
            )
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for key, p in self.factors():
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                avg = self.ema_ipt.get(key, torch.zeros_like(p))
                unc = self.ema_unc.get(key, torch.zeros_like(p))
                self.ema_ipt[key] = avg = b1 * avg + (1 - b1) * ipt
                self.ema_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def score(self, qualname: str, container: str) -> torch.Tensor:
        """s = Ī·Ū of one factor (zeros before its first gradient)."""
        key, p = f"{qualname}.{container}", getattr(self.layers[qualname], container)[self.name]
        return self.ema_ipt.get(key, torch.zeros_like(p)) * self.ema_unc.get(key, torch.zeros_like(p))

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        n = self.name
        scores = [self.score(q, "lora_E").view(-1) + self.score(q, "lora_A").mean(dim=1)
                  + self.score(q, "lora_B").mean(dim=0) for q in self.layers]
        k = self.initial_budget - budget
        if k <= 0:
            return {q: [True] * lay.rank[n] for q, lay in self.layers.items()}
        threshold = torch.kthvalue(torch.cat(scores), k).values.item()
        pattern = {}
        with torch.no_grad():
            for (qualname, layer), s in zip(self.layers.items(), scores, strict=True):
                keep = s > threshold
                layer.lora_E[n].masked_fill_(~keep.view(-1, 1), 0.0)
                layer.rank_mask[n] = keep
                pattern[qualname] = keep.tolist()
        return pattern

    def apply_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for qualname, layer in self.layers.items():
                keep = torch.tensor(pattern[qualname], device=layer.lora_E[self.name].device)
                layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def step(self, model: nn.Module, step: int) -> None:
        """HF PEFT's ``update_and_allocate``."""
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self.update_importance(model)
            budget, mask = self.budget(step)
            if mask:
                self.config.rank_pattern = self.mask_to_budget(model, budget)
        elif step == final:
            # HF PEFT allocates the final budget from the importances up to the previous step: this step's
            # gradients are not folded in.
            self.config.rank_pattern = self.mask_to_budget(model, self.budget(step)[0])
            self.ema_ipt.clear()
            self.ema_unc.clear()
        elif self.config.rank_pattern:
            self.apply_pattern(model, self.config.rank_pattern)

    def state_dict(self) -> dict[str, Any]:
        """Everything the allocator carries between steps, for a training checkpoint (:func:`allocator_state_dict`)."""
        return allocator_state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; checks it all before changing anything (:func:`load_allocator_state`).

        Raises:
            CheckpointError: a missing or unexpected key, or layers/ranks that differ from this model.
            ShapeMismatchError: an EMA tensor whose shape differs from its parameter's.
        """
        load_allocator_state(self, state)


def adalora_step(model: nn.Module, step: int) -> None:
    """Update importances and re-allocate ranks of the model's active AdaLoRA adapters.

    Call after ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``.

    Args:
        model: a model with an AdaLoRA adapter. step: the global training step (from 0).

    Raises:
        AdapterStateError: no AdaLoRA adapter is active, or (on a step that updates importances) none of its
            factors has a gradient.
    """
    state = get_state(model)
    if not any(isinstance(state.configs.get(name), AdaLoRA) for name in state.active):
        raise AdapterStateError(
            f"pk.adalora_step: no active AdaLoRA adapter on {type(model).__name__} (adapters: "
            f"{sorted(state.configs)}, active: {list(state.active)}); apply pk.AdaLoRA or activate it with "
            "pk.set_adapter"
        )
    allocators = model.__dict__.setdefault(_ALLOCATORS, {})
    for name in state.active:
        config = state.configs.get(name)
        if isinstance(config, AdaLoRA):
            if name not in allocators:
                allocators[name] = RankAllocator(model, name, config)
            allocators[name].step(model, step)


@register_method
@dataclass
class AdaLoRA(AdapterConfig):
    """AdaLoRA (HF PEFT names in brackets).

    Attributes:
        init_rank: r₀, the initial rank of every layer [init_r]. target_rank: the average final rank [target_r].
        tinit, tfinal: warm-up and final steps without re-allocation. deltaT: steps between allocations.
        beta1, beta2: EMA factors of importance and uncertainty. orth_reg_weight: weight of R in the loss.
        total_step: the number of training steps (required). alpha [lora_alpha], dropout [lora_dropout].
        rank_pattern: qualified name → kept-triplet mask, filled by training or read from a file.
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (biases of adapted
            layers), as for :class:`~peftkit.methods.lora.LoRA`.
    """

    peft_type = "ADALORA"
    #: The ``bias`` value for the adapted layers' biases (``peftkit compare`` passes each method its spelling).
    bias_only: ClassVar[str] = "lora_only"

    init_rank: int = 12
    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int = 0  # required: validated in __post_init__
    alpha: float = 8
    dropout: float = 0.0
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        for name in ("init_rank", "target_rank", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError(f"total_step={self.total_step!r} must be the number of training steps (> 0)")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"tinit={self.tinit} and tfinal={self.tfinal} must be ≥ 0 and leave steps for "
                              f"allocation: tinit + tfinal < total_step={self.total_step}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be in (0, 1)")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} must be ≥ 0")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's AdaLoRA adapts on this architecture."""
        return with_default_targets(self, model, ADALORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, SVDLinear) or svd_layer_type(module) is not None

    def supported_layer_names(self) -> list[str]:
        return sorted({*LINEAR_KINDS.names(), "Conv2d"})

    def resolve(self, model: nn.Module) -> list[str]:
        """The shared target resolution, refusing grouped convolutions before the model is touched.

        Raises:
            UnsupportedLayerError: a target is an ``nn.Conv2d`` with ``groups > 1`` (named, with the fix).
        """
        targets = super().resolve(model)
        for qualname in targets:
            module = model.get_submodule(qualname)
            base = module.base_layer if isinstance(module, SVDLinear) else module
            if isinstance(base, nn.Conv2d) and base.groups != 1:
                raise UnsupportedLayerError(f"AdaLoRA cannot adapt {qualname!r}: a Conv2d with groups={base.groups} "
                                            f"(groups=1 only). Leave it out with exclude_modules=[{qualname!r}]")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        if isinstance(module, SVDLinear):
            layer = module
        else:
            layer_type = svd_layer_type(module)
            if layer_type is None:  # resolve() only selects supported layers; a guard for direct callers
                raise UnsupportedLayerError(f"AdaLoRA cannot adapt {qualname!r} ({type(module).__name__}); it "
                                            f"supports {', '.join(self.supported_layer_names())}")
            layer = layer_type(module)
        pattern = self.rank_pattern.get(qualname)
        rank = sum(pattern) if pattern is not None else self.init_rank  # a loaded adapter is stored pruned
        layer.add(adapter_name, rank, self.init_rank, self.alpha, self.dropout)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        train_biases(model, self.bias)

        def add_penalty(mod: nn.Module, args: Any, output: Any) -> Any:
            loss = getattr(output, "loss", None)
            state = get_state(mod)
            if isinstance(loss, torch.Tensor) and name in state.active and self.orth_reg_weight > 0 and mod.training:
                output.loss = loss + self.orth_reg_weight * orthogonality_loss(mod, name)
            return output

        handles = model.__dict__.setdefault("_peftkit_adalora_hooks", {})
        handles[name] = model.register_forward_hook(add_penalty)

    def remove(self, model: nn.Module, name: str) -> None:
        handle = model.__dict__.get("_peftkit_adalora_hooks", {}).pop(name, None)
        if handle is not None:
            handle.remove()
        model.__dict__.get(_ALLOCATORS, {}).pop(name, None)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Trained biases (``bias="all"``/``"lora_only"``) under their full HF PEFT keys."""
        paths = hf_module_paths(model, name)
        return {f"base_model.model.{paths[id(m)]}.bias": m.bias for m in bias_modules(model, self.bias)}

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type, "task_type": self.task_type,
            "target_modules": hf_targets(targets, module_names),
            "init_r": self.init_rank, "target_r": self.target_rank, "tinit": self.tinit, "tfinal": self.tfinal,
            "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout, "r": 8,
            "rank_pattern": {f"{k}.lora_E": v for k, v in self.rank_pattern.items()} or None,
            "modules_to_save": list(self.modules_to_save) or None, "bias": self.bias,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> AdaLoRA:
        pattern = {k.removesuffix(".lora_E"): [bool(v) for v in mask]
                   for k, mask in (data.get("rank_pattern") or {}).items()}
        return cls(
            target_modules=hf_layer_targets(data, module_names),
            init_rank=int(data.get("init_r", 12)), target_rank=int(data.get("target_r", 8)),
            tinit=int(data.get("tinit", 0)), tfinal=int(data.get("tfinal", 0)), deltaT=int(data.get("deltaT", 1)),
            beta1=float(data.get("beta1", 0.85)), beta2=float(data.get("beta2", 0.85)),
            orth_reg_weight=float(data.get("orth_reg_weight", 0.5)), total_step=int(data.get("total_step") or 1),
            alpha=data.get("lora_alpha", 8), dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            rank_pattern=pattern, task_type=data.get("task_type"),
            exclude_modules=hf_resolve(data.get("exclude_modules"), module_names),
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            bias=data.get("bias") or "none",
        )
