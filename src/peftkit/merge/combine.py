"""``combine``: a new LoRA (or DoRA) adapter built from existing ones on the same model.

Each source adapter i holds, per adapted module, factors Aᵢ (rᵢ × in) and Bᵢ (out × rᵢ) and a scale
sᵢ = αᵢ/rᵢ (α/√r with rsLoRA; rᵢ and αᵢ per module through rank/alpha patterns), so ΔWᵢ = sᵢ·BᵢAᵢ.
With weights wᵢ the methods are:

- ``cat``: A = [w₁s₁A₁; …; wₙsₙAₙ], B = [B₁ … Bₙ] (rank Σrᵢ). Exactly ΔW = Σᵢ wᵢ·ΔWᵢ.
- ``svd`` (≡ ``task_arithmetic_svd``): Σᵢ wᵢ·ΔWᵢ truncated by SVD to ``rank`` (default: the largest rᵢ of
  the module, capped at min(out, in)); exact when that rank is reached. ``ties_svd``, ``dare_linear_svd``,
  ``dare_ties_svd``, ``magnitude_prune_svd`` apply the matching :mod:`peftkit.merge.merge_utils` function to
  the ΔWᵢ first.
- ``linear`` (≡ ``task_arithmetic``), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the
  merge function applied to the A's and, separately, to the B's, with factor weights ±√|wᵢsᵢ| on A
  and √|wᵢsᵢ| on B (Hugging Face PEFT's ``add_weighted_adapter``). Needs equal ranks per module. Caveat:
  (Σ cᵢBᵢ)(Σ cⱼAⱼ) = Σᵢ cᵢ²BᵢAᵢ + Σᵢ≠ⱼ cᵢcⱼBᵢAⱼ — the cross terms make this an approximation of
  Σᵢ wᵢ·ΔWᵢ that is only exact for one adapter; it keeps the rank, which is why it exists.

LoRA adapters with a bias bᵢ on B (``lora_bias``: the update is sᵢ·(BᵢAᵢx + bᵢ)) combine with ``cat`` only, which is
exact for them too: the new adapter has ``lora_bias`` and b = Σᵢ wᵢsᵢbᵢ (bᵢ = 0 for a source without one). The
other methods refuse them: they approximate ΔW, and no choice of bias is the method's own.

The new adapter has α = r in every module (scale 1, no rsLoRA): every source's own scale, rsLoRA or
not, per-module rank and alpha included, is folded into the new factors — Hugging Face PEFT instead
copies the first source's ``use_rslora`` and mis-scales the result by √r. SVD results are split
evenly, B = U√S and A = √S Vᴴ, so both factors have the same scale for further training.

DoRA adapters (all sources DoRA; mixing DoRA and LoRA is refused) have two parameter groups per module,
the low-rank update ΔVᵢ = sᵢ·BᵢAᵢ of the direction and the magnitude mᵢ, in W'ᵢ = mᵢ·(W₀ + ΔVᵢ)/‖W₀ + ΔVᵢ‖
(row norms). W'ᵢ is not linear in them, so no method can give Σᵢ wᵢ·(W'ᵢ − W₀); instead each group is
combined as a task vector, measured from the point where the adapter is the identity (ΔV = 0, m = ‖W₀‖):

- the ΔVᵢ exactly as the LoRA updates above (``cat``: ΔV = Σᵢ wᵢ·ΔVᵢ exactly; ``svd``: its truncation; …);
- the magnitude m = ‖W₀‖ + f([m₁ − ‖W₀‖, …], w) with the method's merge function f on the offsets
  (``task_arithmetic`` for ``cat``, ``svd`` and ``linear``; ``ties``, ``dare_*``, ``magnitude_prune`` and their
  ``_svd`` forms use theirs, with the same density, sign rule and seed): with weights summing to 1 and a
  linear method this is the weighted mean Σᵢ wᵢ·mᵢ, and one adapter with weight 1 is reproduced exactly.

The result is a DoRA adapter (``use_dora: true`` on disk).

Modules the sources train in full (``modules_to_save``, e.g. a classifier head) get a copy in the new adapter too,
combined from the sources' copies as task vectors of the base module with the same merge function as DoRA's
magnitudes (:mod:`peftkit.merge.combine_saved`); Hugging Face PEFT gives the new adapter untrained copies instead.
Adapters that train the base model's biases (``bias`` other than ``"none"``, trained in place, with no base value
kept to measure from) or embedding rows (``trainable_token_indices``) are refused.

Adapters of different modules combine over the union of their modules: in a module a source does not adapt, its
update is zero and it takes no part in that module's merge (its weight, density draws and sign votes included),
as in Hugging Face PEFT.

With a single source adapter Hugging Face PEFT replaces any method by ``linear`` (density ignored); here the method
still applies, so e.g. ``ties`` with ``density=0.5`` trims that adapter's factors.

References: task arithmetic (Ilharco et al., 2023, arXiv:2212.04089), TIES (Yadav et al., 2023,
arXiv:2306.01708), DARE (Yu et al., 2023, arXiv:2311.03099).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.inject import apply
from peftkit.core.layer import AdapterLayer
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import AdapterExistsError, AdapterNotFoundError, AdapterStateError, ConfigError
from peftkit.merge import merge_utils as mu
from peftkit.merge.combine_saved import check_saved, combine_saved, saved_patterns, write_saved
from peftkit.merge.trim import check_density, check_sign_method
from peftkit.methods.dora import DoRA
from peftkit.methods.lora import LoRA
from peftkit.methods.lora_init import check_plain
from peftkit.methods.lora_layers import LoRALayer

__all__ = ["COMBINATION_METHODS", "combine"]

_FACTOR_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "task_arithmetic": mu.task_arithmetic,
    "ties": mu.ties,
    "dare_linear": mu.dare_linear,
    "dare_ties": mu.dare_ties,
    "magnitude_prune": mu.magnitude_prune,
}
_ALIASES = {"linear": "task_arithmetic", "svd": "task_arithmetic_svd"}
#: Every ``method`` name ``combine`` accepts.
COMBINATION_METHODS = (
    "cat",
    "linear",
    "svd",
    *_FACTOR_FNS,
    *(f"{m}_svd" for m in _FACTOR_FNS if m != "task_arithmetic"),
)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_SIGN = ("ties", "dare_ties")


# ------------------------------------------------------------------------------------ factor access


def factors(layer: AdapterLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s (A, B) as stored: A has the rank on dim 0, B on dim 1 (linear, conv, embedding)."""
    found = []
    for attr in layer.adapter_containers[:2]:
        item = getattr(layer, attr)[name]
        found.append(item if isinstance(item, nn.Parameter) else item.weight)
    return found[0], found[1]


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D views (r × k) and (out × r) with B @ A the adapter's unscaled update (conv kernels flattened)."""
    rank = A.shape[0]
    return A.reshape(rank, -1), B.reshape(B.shape[0], rank)


def like_factors(
    A2: torch.Tensor, B2: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape new 2-D factors of any rank to the layout of the stored A and B."""
    rank = A2.shape[0]
    return A2.reshape(rank, *A.shape[1:]), B2.reshape(B.shape[0], rank, *B.shape[2:])


def split_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A, B) of M with B @ A ≈ M, singular values split √S to each side."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def write_factors(layer: AdapterLayer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Copy new factor values into adapter ``name`` of ``layer`` (shapes must already match)."""
    own_A, own_B = factors(layer, name)
    with torch.no_grad():
        own_A.copy_(A.to(own_A.dtype))
        own_B.copy_(B.to(own_B.dtype))


# ------------------------------------------------------------------------------------ validation


def check_options(
    method: str, density: float | None, majority_sign_method: str, rank: int | None, seed: int | None
) -> str:
    """Validate the options of :func:`combine` that need no model (also for ``peftkit combine`` before it loads one).

    Returns:
        the canonical method name.

    Raises:
        ConfigError: an option is invalid or does not apply to ``method``.
    """
    if method not in COMBINATION_METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(COMBINATION_METHODS)}")
    canonical = _ALIASES.get(method, method)
    base = canonical.removesuffix("_svd")
    if base in _NEEDS_DENSITY:
        if density is None:
            raise ConfigError(f"method={method!r} needs density= (fraction of entries kept, in (0, 1])")
        check_density(density)
    elif density is not None:
        raise ConfigError(
            f"density={density!r} is not used by method={method!r}; drop it or use ties/dare/magnitude_prune"
        )
    if base in _NEEDS_SIGN:
        check_sign_method(majority_sign_method)
    if rank is not None and (
        not canonical.endswith("_svd") or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
    ):
        raise ConfigError(f"rank={rank!r} must be a positive integer, and is used only by the *svd methods")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} must be an integer (or None for the global torch generator)")
    return canonical


def _check(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str,
    name: str,
    density: float | None,
    majority_sign_method: str,
    rank: int | None,
    seed: int | None,
) -> tuple[str, list[str], list[tuple[str, LoRALayer]]]:
    """Validate everything before the model is touched; return (canonical method, targets, layers)."""
    state = get_state(model)
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(
            f"weights={weights!r} must map adapter names to weights, e.g. {{'task1': 0.7, 'task2': 0.3}}"
        )
    for adapter, weight in weights.items():
        if adapter not in state.configs:
            raise AdapterNotFoundError(
                f"no adapter named {adapter!r} on this model; "
                f"its adapters are {sorted(state.configs) or 'none'}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"weight for {adapter!r} is {weight!r}; weights must be numbers")
        if not math.isfinite(weight):
            raise ConfigError(f"weight for {adapter!r} is {weight!r}; weights must be finite numbers")
    canonical = check_options(method, density, majority_sign_method, rank, seed)
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"name={name!r} must be a non-empty adapter name without dots, e.g. 'mix'")
    if name in state.configs:
        raise AdapterExistsError(f"an adapter named {name!r} already exists; pass another name=")
    kinds = {adapter: type(state.configs[adapter]) for adapter in weights}
    for adapter in weights:
        config = state.configs[adapter]
        if not isinstance(config, LoRA) or kinds[adapter] not in (LoRA, DoRA):
            raise ConfigError(
                f"adapter {adapter!r} is {type(config).__name__}; combine supports LoRA and DoRA adapters "
                "(rsLoRA and per-module rank/alpha included)"
            )
        check_plain(model, adapter, "pk.combine")
        if config.bias != "none" or config.trainable_token_indices is not None:
            raise ConfigError(
                f"adapter {adapter!r} also trains the base model's biases or embedding rows (bias={config.bias!r}, "
                f"trainable_token_indices={config.trainable_token_indices}), which combine does not mix; combine "
                "adapters trained with bias='none' and without trainable_token_indices"
            )
        if config.target_parameters:
            raise ConfigError(
                f"adapter {adapter!r} adapts parameters ({config.target_parameters[:2]}…: one packed LoRA per "
                "expert), which combine does not mix; combine adapters of modules only"
            )
    biased = sorted(a for a in weights if cast(LoRA, state.configs[a]).lora_bias)
    if biased and canonical != "cat":
        raise ConfigError(
            f"adapters {biased} have lora_bias=True (a trained bias on B); only method='cat' combines them "
            f"(exactly), not method={method!r}"
        )
    if len(set(kinds.values())) > 1:
        raise ConfigError(
            f"adapters {sorted(a for a, k in kinds.items() if k is DoRA)} are DoRA and "
            f"{sorted(a for a, k in kinds.items() if k is LoRA)} plain LoRA; combine adapters of one kind "
            "(a LoRA adapter has no magnitude to combine with DoRA's)"
        )
    names = list(weights)
    # Every module any source adapts; in a module a source does not adapt, its update is zero (as in HF PEFT).
    targets = sorted(set().union(*(state.targets[adapter] for adapter in names)))
    _check_extras(state.configs, names)
    check_saved(model, names)
    layers = [(q, cast(LoRALayer, layer)) for q, layer in adapter_layers(model) if q in set(targets)]
    for qualname, layer in layers:
        if layer.merged_adapters:
            raise AdapterStateError(
                f"{qualname} has merged adapters {layer.merged_adapters}; call pk.unmerge first"
            )
        if canonical in _FACTOR_FNS:
            ranks = {a: layer.rank[a] for a in names if layer.has_adapter(a)}
            if len(set(ranks.values())) > 1:
                raise ConfigError(
                    f"method={method!r} needs equal ranks, but {qualname} has ranks {ranks}; use 'cat' or an "
                    "*_svd method, which handle different ranks"
                )
    return canonical, targets, layers


def _check_extras(configs: Mapping[str, Any], names: Sequence[str]) -> None:
    """Adapters loaded from disk remember their base model: refuse to mix different ones."""
    bases = {a: configs[a].extra.get("base_model_name_or_path") for a in names}
    known = {b for b in bases.values() if b}
    if len(known) > 1:
        raise ConfigError(
            f"the adapters were trained on different base models {bases}; combine adapters of one base"
        )


# ------------------------------------------------------------------------------------ the methods


def _factor_merge(
    fn: Callable[..., torch.Tensor], layer: LoRALayer, weights: Mapping[str, float], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    As, Bs, wa, wb = [], [], [], []
    for adapter, weight in weights.items():
        A, B = factors(layer, adapter)
        scaled = weight * layer.scaling[adapter]
        root = abs(scaled) ** 0.5
        As.append(A.detach())
        Bs.append(B.detach())
        wa.append(root if scaled >= 0 else -root)  # the sign on one side only
        wb.append(root)
    return fn(As, wa, **kwargs), fn(Bs, wb, **kwargs)


def _cat(layer: LoRALayer, weights: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    As, Bs = [], []
    for adapter, weight in weights.items():
        A, B = factors(layer, adapter)
        As.append(A.detach() * (weight * layer.scaling[adapter]))
        Bs.append(B.detach())
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _cat_bias(layer: LoRALayer, weights: Mapping[str, float]) -> torch.Tensor | None:
    """Σᵢ wᵢsᵢbᵢ over the sources with a bias on B (``lora_bias``), or ``None`` when none has one."""
    terms = []
    for adapter, weight in weights.items():
        bias = layer.up_bias(adapter)
        if bias is not None:
            terms.append(bias.detach() * (weight * layer.scaling[adapter]))
    return torch.stack(terms).sum(0) if terms else None


def _svd(
    fn: Callable[..., torch.Tensor],
    layer: LoRALayer,
    weights: Mapping[str, float],
    rank: int | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = []
    for adapter in weights:
        A2, B2 = as_matrices(*factors(layer, adapter))
        deltas.append((B2.detach() @ A2.detach()) * layer.scaling[adapter])
    merged = fn(deltas, list(weights.values()), **kwargs)
    A, B = factors(layer, next(iter(weights)))
    new_rank = min(rank or max(layer.rank[a] for a in weights), *merged.shape)
    A2, B2 = split_svd(merged.to(torch.promote_types(merged.dtype, torch.float32)), new_rank)
    return like_factors(A2, B2, A, B)


def _magnitude(
    fn: Callable[..., torch.Tensor], layer: LoRALayer, weights: Mapping[str, float], kwargs: dict[str, Any]
) -> torch.Tensor:
    """DoRA: m = ‖W₀‖ + fn(magnitude offsets mᵢ − ‖W₀‖, weights) (see the module doc)."""
    magnitudes = cast(Any, layer).lora_magnitude_vector
    first = magnitudes[next(iter(weights))]
    identity = cast(Any, layer).base_norms().to(first.dtype)  # the magnitude of an adapter that changes nothing
    offsets = [magnitudes[adapter].detach() - identity for adapter in weights]
    merged: torch.Tensor = identity + fn(offsets, list(weights.values()), **kwargs)
    return merged


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "cat",
    name: str = "combined",
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> nn.Module:
    """Add an adapter ``name`` that combines existing LoRA (or DoRA) adapters of ``model`` (see the module doc).

    Everything is checked before the model changes; the new adapter is added inactive
    (``pk.set_adapter(model, name)`` to use it).

    Args:
        model: a model holding the adapters named in ``weights``.
        weights: adapter name → weight, e.g. ``{"task1": 0.7, "task2": 0.3}``; negative weights subtract.
        method: one of :data:`COMBINATION_METHODS`; ``cat`` (exact) by default.
        name: the new adapter's name.
        rank: the new rank for the ``*svd`` methods (default: the largest source rank of each module).
        density: fraction of entries kept, in (0, 1], for ties / dare / magnitude_prune methods.
        majority_sign_method: ``"total"`` or ``"frequency"`` for the ties methods.
        seed: seeds DARE's random drops (``None``: the global torch generator, as Hugging Face PEFT; its
            ``add_weighted_adapter`` first initialises the new adapter from that generator, so under one
            ``torch.manual_seed`` its masks are later draws than these).

    Returns:
        ``model`` itself.

    Raises:
        AdapterNotFoundError: an unknown adapter. AdapterExistsError: ``name`` is taken.
        ConfigError: an unknown method, a non-finite weight, a non-integer seed, a missing/out-of-range
            density, unequal ranks for a factor-space method, adapters of different base models, an
            adapter that is neither LoRA nor DoRA, a mix of LoRA and DoRA adapters, ``lora_bias`` adapters with
            a method other than ``cat``, an adapter training base biases (``bias``) or ``trainable_token_indices``,
            or sources whose ``modules_to_save`` modules nest.
        AdapterStateError: the model has merged adapters.
    """
    canonical, targets, layers = _check(model, weights, method, name, density, majority_sign_method, rank, seed)
    base = canonical.removesuffix("_svd")
    kwargs: dict[str, Any] = {}
    if base in _NEEDS_DENSITY:
        kwargs["density"] = density
    if base in _NEEDS_SIGN:
        kwargs["majority_sign_method"] = majority_sign_method
    if base.startswith("dare") and seed is not None:
        layer0 = layers[0][1]
        device = factors(layer0, next(a for a in weights if layer0.has_adapter(a)))[0].device
        kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)

    first = cast(LoRA, get_state(model).configs[next(iter(weights))])  # checked by _check
    dora = isinstance(first, DoRA)
    # DoRA magnitudes and modules_to_save copies are combined as dense task vectors (see the module doc).
    dense_fn = _FACTOR_FNS["task_arithmetic" if canonical == "cat" else base]
    new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for qualname, layer in layers:
            present = {a: w for a, w in weights.items() if layer.has_adapter(a)}  # the others add nothing here
            if canonical == "cat":
                new[qualname] = _cat(layer, present)
                bias = _cat_bias(layer, present)
                if bias is not None:
                    biases[qualname] = bias
            elif canonical.endswith("_svd"):
                new[qualname] = _svd(_FACTOR_FNS[base], layer, present, rank, kwargs)
            else:
                new[qualname] = _factor_merge(_FACTOR_FNS[base], layer, present, kwargs)
            if dora:
                magnitudes[qualname] = _magnitude(dense_fn, layer, present, kwargs)
        saved = combine_saved(model, weights, dense_fn, kwargs)

    ranks = {q: int(A.shape[0]) for q, (A, _) in new.items()}
    config = lora_config_for(model, first, ranks, lora_bias=bool(biases),
                             modules_to_save=saved_patterns(model, list(weights)))
    with torch.random.fork_rng(devices=[]):  # the new factors are overwritten: leave the global RNG alone
        # The new adapter saves exactly its sources' modules: no classifier head of its own beyond theirs.
        apply(model, config, name=name, activate=False, train_heads=False)
    write_saved(model, name, saved)
    modules = dict(model.named_modules())
    for qualname, (A, B) in new.items():
        write_factors(cast(AdapterLayer, modules[qualname]), name, A, B)
        if dora:
            own = cast(Any, modules[qualname]).lora_magnitude_vector[name]
            with torch.no_grad():
                own.copy_(magnitudes[qualname].to(own.dtype))
        if qualname in biases:
            own_bias = cast(torch.Tensor, cast(LoRALayer, modules[qualname]).up_bias(name))
            with torch.no_grad():
                own_bias.copy_(biases[qualname].to(own_bias.dtype))
    return model


def lora_config_for(
    model: nn.Module, template: LoRA, ranks: Mapping[str, int], alphas: Mapping[str, float] | None = None,
    lora_bias: bool = False, modules_to_save: Sequence[str] = (),
) -> LoRA:
    """A LoRA config adapting exactly the modules of ``ranks`` with those ranks (α = r unless ``alphas``), with a
    bias on B when ``lora_bias``, training ``modules_to_save`` in full.

    Other fields (dropout, its position, task type, the HF extras such as the base model path) are
    taken from ``template``; a DoRA ``template`` gives a DoRA config.
    """
    alphas = dict(alphas) if alphas is not None else {q: float(r) for q, r in ranks.items()}
    default_rank = max(ranks.values())
    default_alpha = alphas[max(ranks, key=lambda q: ranks[q])]
    # Most specific name first, so that first-match lookups of a pattern dict are exact.
    order = sorted(ranks, key=lambda q: -q.count("."))
    config = (DoRA if isinstance(template, DoRA) else LoRA)(
        target_modules=order,
        rank=default_rank,
        alpha=default_alpha,
        # Every module listed when any differs: a suffix-matching key can then never shadow a default.
        rank_pattern={q: ranks[q] for q in order} if len(set(ranks.values())) > 1 else {},
        alpha_pattern={q: alphas[q] for q in order} if len(set(alphas.values())) > 1 else {},
        dropout=template.dropout,
        dropout_position=template.dropout_position,
        lora_bias=lora_bias,
        modules_to_save=list(modules_to_save),
        task_type=template.task_type,
        extra=dict(template.extra),
    )
    extra = sorted(set(config.resolve(model)) - set(ranks))
    if extra:  # a target name that is also a suffix of another module's name
        config = cast(LoRA, config.replace(exclude_modules=extra))
        if set(config.resolve(model)) != set(ranks):
            raise ConfigError(
                f"cannot express the targets {sorted(ranks)[:4]} exactly as patterns on this model"
            )
    return config
