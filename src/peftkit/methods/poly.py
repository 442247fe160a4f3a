"""Poly (Polytropon): each task mixes LoRA modules from a shared inventory of skills.

Papers: Ponti, Sordoni, Bengio and Reddy, "Combining Parameter-efficient Modules for Task-level Generalisation",
EACL 2023 (https://arxiv.org/abs/2202.13914); Caccia et al., "Multi-Head Adapter Routing for Cross-Task
Generalization", NeurIPS 2023 (https://arxiv.org/abs/2211.03831) for ``n_splits`` > 1. Hugging Face PEFT 0.21.2's
``POLY`` is the reference for everything below.

Each adapted layer holds S = ``n_skills`` LoRA modules (A_s, B_s) of rank r, each cut into Q = ``n_splits`` heads
along the input (A) and output (B) features, and a table of routing logits Z ∈ ℝ^{T × Q·S}, one row per task
(T = ``n_tasks``). Example i, of task tᵢ (the ``task_ids`` passed with the call), uses per head q the mixture::

    wᵢ[q, s] = σ(Z[tᵢ, q, s]) / Σ_s' σ(Z[tᵢ, q, s'])        (training: a relaxed-Bernoulli sample at temperature 1
                                                              replaces σ(Z), so the selection is learned)
    Aᵢ[q] = Σ_s wᵢ[q, s] A_s[q],   Bᵢ[q] = Σ_s wᵢ[q, s] B_s[q]
    x ↦ W₀x + (1/r) · x Aᵢ Bᵢ                               (the heads of A side by side along the input
                                                              features, those of B along the output features)

A_s[q] starts kaiming-uniform (``nn.Linear``'s default, drawn per skill then per head as HF PEFT draws it), B_s at
zero (``init_weights=False``: kaiming-uniform too) and Z ~ U(−10⁻³, 10⁻³). Keys, as HF PEFT's: ``…<layer>.poly_lora_A``
(Q, S, in/Q, r), ``poly_lora_B`` (Q, S, r, out/Q) and ``poly_router.module_logits`` (T, Q·S).

Task ids travel as in :mod:`peftkit.methods.multitask_prompt`: ``model(..., task_ids=ids)`` and
``model.generate(..., task_ids=ids)``; a forward pre-hook on the model takes them out of the call and hands them to
the Poly layers, which keep them until the next call (so gradient checkpointing recomputes with them). Unlike HF PEFT,
a call without ``task_ids`` is allowed when ``n_tasks == 1``: every example is of task 0 (there is no other choice),
so the command line trains and evaluates Poly like any method. The update depends on each example's task, so it
cannot be folded into a weight: ``merge`` is an error, as in HF PEFT. ``nn.Linear`` and quantized linear layers (HF
PEFT: ``nn.Linear`` and its subclasses); not GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LinearKind, linear_kind, register_method
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.miss import is_linear, supported_names
from peftkit.methods.prompt import check_task_ids, has_prompt_hooks, pass_task_ids, stop_passing_task_ids

POLY_TYPES = ("poly",)
#: Keeps the normalisation finite when every mixing weight of a head is zero (HF PEFT's constant).
EPS = 1e-12
_HOOK = "_peftkit_poly_hook"


class PolyRouter(nn.Module):
    """One adapter's routing logits Z (``module_logits``, T × Q·S) and the mixing weights they give."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_tasks, self.n_splits, self.n_skills = n_tasks, n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills).uniform_(-1e-3, 1e-3))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """w, (len(task_ids), Q, S): each head's skills weighted to sum to 1 (sampled in training mode)."""
        logits = self.module_logits[task_ids.to(self.module_logits.device)].view(-1, self.n_splits, self.n_skills)
        if self.training:  # a differentiable sample of which skills each head uses
            temperature = torch.ones((), dtype=logits.dtype, device=logits.device)
            chosen = RelaxedBernoulli(temperature, logits=logits).rsample()
        else:
            chosen = torch.sigmoid(logits)
        return chosen / (chosen.sum(dim=-1, keepdim=True) + EPS)


def _kaiming_stack(n_skills: int, n_splits: int, rows: int, cols: int) -> torch.Tensor:
    """(n_splits, n_skills, cols, rows): for each skill, then each head, a (rows, cols) draw from the global
    generator as ``nn.Linear`` initialises its weight, transposed; HF PEFT's order of draws."""
    out = torch.empty(n_splits, n_skills, cols, rows)
    for skill in range(n_skills):
        for head in range(n_splits):
            out[head, skill] = nn.init.kaiming_uniform_(torch.empty(rows, cols), a=math.sqrt(5)).T
    return out


class PolyLayer(AdapterLayer):
    """Poly adapters on an ``nn.Linear`` or a quantized linear layer: ``base(x) + (1/r)·x Aᵢ Bᵢ`` per example i.

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type (GPT-2's ``Conv1D`` included, as in HF PEFT).
    """

    adapter_containers = ("poly_lora_A", "poly_lora_B", "poly_router")

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear(base_layer):
            raise UnsupportedLayerError(f"Poly cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(supported_names())}")
        super().__init__(base_layer)
        kind = cast(LinearKind, linear_kind(base_layer))
        self.in_features, self.out_features = kind.in_features(base_layer), kind.out_features(base_layer)
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()
        self.poly_router = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        #: The current call's task ids and their least and greatest values, set by the model's pre-hook
        #: (:func:`_take_task_ids`), which reads the bounds once per call rather than once per layer.
        self.task_ids: Any = None
        self.task_bounds: tuple[int, int] | None = None

    def add(self, name: str, rank: int, n_tasks: int, n_skills: int, n_splits: int, init_weights: bool) -> None:
        """Add adapter ``name``, drawn from the global generator in HF PEFT's order (A, then B unless zero, then Z);
        over a half-precision base rounded to its dtype and kept in fp32, as HF PEFT does."""
        a = _kaiming_stack(n_skills, n_splits, rank, self.in_features // n_splits)
        if init_weights:
            b = torch.zeros(n_splits, n_skills, rank, self.out_features // n_splits)
        else:
            b = _kaiming_stack(n_skills, n_splits, self.out_features // n_splits, rank)
        router = PolyRouter(n_tasks, n_splits, n_skills)
        weight = cast(LinearKind, linear_kind(self.base_layer)).weight(self.base_layer)
        stored = getattr(self.base_layer, "weight", None)
        rounded = stored.dtype if isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point else None

        def placed(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter((t.to(rounded) if rounded else t).to(weight.device, adapter_dtype(weight)))

        self.poly_lora_A[name], self.poly_lora_B[name] = placed(a), placed(b)
        router.module_logits = placed(router.module_logits.detach())
        self.poly_router[name] = router
        self.rank[name] = rank

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.rank.pop(name, None)

    def _ids(self, name: str, batch: int) -> torch.Tensor:
        """This call's task ids, checked against ``batch`` and adapter ``name``'s ``n_tasks``.

        Raises:
            ConfigError: no ``task_ids`` with ``n_tasks`` > 1, or not one valid task index per example.
        """
        n_tasks = cast(PolyRouter, self.poly_router[name]).n_tasks
        ids = self.task_ids
        if ids is None:
            if n_tasks == 1:
                return torch.zeros(batch, dtype=torch.long)
            raise ConfigError(f"Poly adapter {name!r} has n_tasks={n_tasks}: call the model with task_ids, one task "
                              f"index per example, e.g. model(input_ids=..., task_ids=torch.tensor([...])) with "
                              f"{batch} values in [0, {n_tasks})")
        ids = check_task_ids(ids, batch)
        low, high = self.task_bounds or (0, 0)
        if low < 0 or high >= n_tasks:
            raise ConfigError(f"task_ids={ids.tolist()} has values outside [0, {n_tasks}); Poly adapter {name!r} has "
                              f"n_tasks={n_tasks}")
        return ids

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Adapter ``name``'s (1/r)·x Aᵢ Bᵢ for ``x`` (batch, …, in), in its tensors' dtype."""
        lora_a, lora_b = self.poly_lora_A[name], self.poly_lora_B[name]
        batch, rank = x.shape[0], self.rank[name]
        weights = self.poly_router[name](self._ids(name, batch))  # (batch, Q, S)
        a = torch.einsum("bqs,qsdr->bqdr", weights, lora_a).reshape(batch, self.in_features, rank)
        b = torch.einsum("bqs,qsrd->bqrd", weights, lora_b).transpose(1, 2).reshape(batch, rank, self.out_features)
        rows = x.to(lora_a.dtype).reshape(batch, -1, self.in_features)
        return (rows.bmm(a).bmm(b) / rank).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        for name in self._applied():  # each added and rounded to the output's dtype in turn, as HF PEFT adds them
            result = (result + self.update(x, name)).to(result.dtype)
        return result

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        raise MergeError(
            f"the Poly adapters {list(names)} at {where or type(self.base_layer).__name__} cannot be merged: each "
            "example mixes the skills its task routes to, so no single weight holds the update. Keep them unmerged "
            "(pk.unload(model, merge=False) drops them)."
        )


def _take_task_ids(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The model's forward pre-hook: this call's ``task_ids`` (or ``None``) out of its arguments, into every Poly
    layer. It reads the layers from the module called, so a copy of the model routes its own. It runs before the
    prompt-learning hooks and leaves the ids to them where they are (a multi-task prompt beside Poly reads them too)."""
    ids = kwargs.get("task_ids")
    bounds = None
    if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
        bounds = (int(ids.min()), int(ids.max()))
    for module in model.modules():
        if isinstance(module, PolyLayer):
            module.task_ids, module.task_bounds = ids, bounds
    if has_prompt_hooks(model):
        return args, kwargs
    return args, {k: v for k, v in kwargs.items() if k != "task_ids"}


@register_method
@dataclass
class Poly(AdapterConfig):
    """Poly: per-task routing over an inventory of LoRA skills (HF PEFT's ``PolyConfig``, its defaults).

    Attributes:
        rank: r, the rank of each skill's LoRA module (HF PEFT's ``r``).
        n_tasks: T, the number of tasks; each call passes ``task_ids`` in [0, T) (optional when T is 1).
        n_skills: S, the LoRA modules (skills) per layer that the tasks mix.
        n_splits: Q, the heads each skill is cut into, routed separately; Q > 1 is Multi-Head Routing (MHR). It must
            divide every target's input and output sizes.
        poly_type: the router; ``"poly"`` (the only one HF PEFT has).
        init_weights: ``True``: B = 0, the model unchanged at first; ``False``: B kaiming-uniform like A.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, an ``n_splits`` that does not
            divide a target's sizes (the target and its sizes named).
        UnsupportedLayerError: in ``pk.apply``, a target that is not an ``nn.Linear`` or a quantized linear layer.
    """

    peft_type = "POLY"

    rank: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    poly_type: str = "poly"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("rank", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a positive integer (e.g. {{'rank': 8, 'n_tasks': 2, "
                                  f"'n_skills': 4, 'n_splits': 1}}[{key!r}])")
        if self.poly_type not in POLY_TYPES:
            raise ConfigError(f"poly_type={self.poly_type!r} is not supported; use one of {POLY_TYPES}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    # -- what the method adapts -------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second Poly adapter only
            return isinstance(module, PolyLayer)
        return is_linear(module)

    def supported_layer_names(self) -> list[str]:
        return supported_names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to have sizes ``n_splits`` divides, before the model changes."""
        targets = super().resolve(model)
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, PolyLayer) else module
            kind = cast(LinearKind, linear_kind(base))
            sizes = (kind.in_features(base), kind.out_features(base))
            if any(size % self.n_splits for size in sizes):
                raise ConfigError(f"n_splits={self.n_splits} does not divide the sizes {sizes} (in, out) of {name}; "
                                  "choose a common divisor of every target's input and output sizes")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, PolyLayer) else PolyLayer(module)
        layer.add(adapter_name, self.rank, self.n_tasks, self.n_skills, self.n_splits, self.init_weights)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        """Route ``task_ids`` of the model's calls (and of ``generate``) to its Poly layers, once per model."""
        if _HOOK not in model.__dict__:
            model.__dict__[_HOOK] = model.register_forward_pre_hook(_take_task_ids, with_kwargs=True, prepend=True)
            pass_task_ids(model, "poly")

    def remove(self, model: nn.Module, name: str) -> None:
        """With the model's last Poly adapter gone, its calls take no ``task_ids`` any more."""
        if _HOOK in model.__dict__ and not any(isinstance(m, PolyLayer) for m in model.modules()):
            model.__dict__.pop(_HOOK).remove()
            stop_passing_task_ids(model, "poly")

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("layers_to_transform", "layers_pattern"),
            r=self.rank,
            init_weights=self.init_weights,
            poly_type=self.poly_type,
            n_tasks=self.n_tasks,
            n_skills=self.n_skills,
            n_splits=self.n_splits,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> Poly:
        unknown = hf_unknown_options(data, _HF_FIELDS, "Poly")
        return cls(
            **hf_layer_fields(data, module_names),
            rank=data.get("r", 8),
            n_tasks=data.get("n_tasks", 1),
            n_skills=data.get("n_skills", 4),
            n_splits=data.get("n_splits", 1),
            poly_type=data.get("poly_type", "poly"),
            init_weights=bool(data.get("init_weights", True)),
            extra={k: v for k, v in data.items() if k in unknown or k in ("auto_mapping", "peft_version")},
        )


#: ``adapter_config.json`` fields of Poly (besides HF PEFT's bookkeeping).
_HF_FIELDS = frozenset("r n_tasks n_skills n_splits poly_type init_weights target_modules exclude_modules "
                       "modules_to_save".split())
