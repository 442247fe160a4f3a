"""Task-vector arithmetic: pure functions that merge several task tensors (or state dicts) into one.

A *task tensor* τᵢ is a weight update: a LoRA factor, a LoRA ΔW, or a fully fine-tuned weight minus its
pretrained value. With weights wᵢ and density d ∈ (0, 1]:

- task arithmetic (Ilharco et al., 2023, arXiv:2212.04089):   τ = Σᵢ wᵢ·τᵢ
- magnitude prune:   τ = Σᵢ wᵢ·trim_d(τᵢ), where trim_d keeps the ⌊d·numel⌋ entries of largest |·|
- TIES (Yadav et al., 2023, arXiv:2306.01708): trim each τᵢ by magnitude, elect a sign per entry
  γ = sgn(Σᵢ τ̂ᵢ) ("total") or sgn(Σᵢ sgn τ̂ᵢ) ("frequency"), then take the disjoint mean
  τ = Σᵢ [sgn τ̂ᵢ = γ]·wᵢ·τ̂ᵢ / max(1, Σᵢ [sgn τ̂ᵢ = γ])
- DARE (Yu et al., 2023, arXiv:2311.03099): drop each entry with probability 1 − d and rescale the
  survivors by 1/d, τ̂ᵢ = mᵢ ⊙ τᵢ / d with mᵢ ~ Bernoulli(d); ``dare_linear`` then sums Σᵢ wᵢ·τ̂ᵢ,
  ``dare_ties`` applies TIES' sign election and disjoint mean to the τ̂ᵢ.

The functions take ``(task_tensors, weights, density, majority_sign_method)`` like Hugging Face PEFT's
``peft.utils.merge_utils`` functions of the same names and give the same results on the same tensors
(and, for DARE, the same ``torch.manual_seed``): the weights apply per task before the disjoint mean,
and the sign is elected on the unweighted trimmed tensors, as PEFT does. Unlike PEFT they never stack
the task tensors into one (n, …) tensor, so the peak extra memory of ``task_arithmetic``,
``magnitude_prune`` and ``dare_linear`` is one tensor rather than n; they also accept state dicts
(``{name: tensor}``, merged key by key) and return the task tensors' dtype. The trimming and
sign-election primitives (``prune``, ``calculate_majority_sign_mask``, ...) live in
:mod:`peftkit.merge.trim` and are re-exported here, as PEFT's module holds them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch

from peftkit.errors import ConfigError
from peftkit.merge.trim import (
    PruneMethod,
    SignMethod,
    calculate_majority_sign_mask,
    check_density,
    check_sign_method,
    disjoint_merge,
    elected_sign,
    magnitude_based_pruning,
    prune,
    random_pruning,
)

__all__ = [
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_based_pruning",
    "magnitude_prune",
    "prune",
    "random_pruning",
    "task_arithmetic",
    "ties",
]

Weights = torch.Tensor | Sequence[float]
StateDict = dict[str, torch.Tensor]
_T = TypeVar("_T", torch.Tensor, StateDict)


# --------------------------------------------------------------------------------------------- checks


def _weight_list(weights: Weights, count: int) -> list[float]:
    values = weights.detach().reshape(-1).tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != count:
        raise ConfigError(
            f"got {len(values)} weights for {count} task tensors: pass exactly one weight per task "
            f"(weights={values!r})"
        )
    floats = [float(w) for w in values]
    for index, weight in enumerate(floats):
        if not math.isfinite(weight):
            raise ConfigError(f"weight {index} is {weight!r}; weights must be finite numbers (weights={floats!r})")
    return floats


def _check_shapes(tensors: Sequence[torch.Tensor], key: str | None = None) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        where = f" for key {key!r}" if key is not None else ""
        raise ConfigError(
            f"task tensors{where} have different shapes {sorted(shapes)}; they must all have one shape"
        )


# --------------------------------------------------------------------------------------------- merges


def _weighted_sum(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    # Accumulate instead of stacking: one extra tensor of memory however many tasks there are. A lazy
    # iterable of tensors (e.g. pruned on the fly) keeps it at one. Sums in float32 at least.
    total: torch.Tensor | None = None
    dtype = torch.float32
    for tensor, weight in zip(tensors, weights, strict=True):
        if total is None:
            dtype = tensor.dtype
            total = tensor.to(torch.promote_types(dtype, torch.float32)) * weight
        else:
            total.add_(tensor, alpha=weight)
    if total is None:
        raise ConfigError("task_tensors is empty: pass at least one tensor or state dict to merge")
    return total.to(dtype)


def _ties_merge(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], method: SignMethod
) -> torch.Tensor:
    # Elect the sign on the unweighted (trimmed) tensors, then average the weighted ones that agree.
    work = torch.promote_types(tensors[0].dtype, torch.float32)
    votes = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for tensor in tensors:
        votes.add_(tensor if method == "total" else tensor.sign())
    elected = elected_sign(votes)
    total = torch.zeros_like(votes)
    count = torch.zeros_like(votes)
    for tensor, weight in zip(tensors, weights, strict=True):
        agree = tensor.sign() == elected
        total.add_(torch.where(agree, tensor.to(work) * weight, 0.0))
        count.add_(agree.to(work))
    return (total / count.clamp(min=1.0)).to(tensors[0].dtype)


def _merge(
    task_tensors: Sequence[_T],
    weights: Weights,
    merge_one: Callable[[Sequence[torch.Tensor], list[float]], torch.Tensor],
) -> _T:
    """Apply ``merge_one`` to plain tensors or, key by key, to state dicts."""
    if len(task_tensors) == 0:
        raise ConfigError("task_tensors is empty: pass at least one tensor or state dict to merge")
    values = _weight_list(weights, len(task_tensors))
    first = task_tensors[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(t, torch.Tensor) for t in task_tensors):
            raise ConfigError("task_tensors mixes tensors and state dicts: pass one kind")
        _check_shapes(task_tensors)
        return merge_one(task_tensors, values)
    keys = list(first)
    for index, state in enumerate(task_tensors[1:], start=1):
        if not isinstance(state, Mapping) or set(state) != set(keys):
            other = set(state) if isinstance(state, Mapping) else set()
            missing, extra = sorted(set(keys) - other), sorted(other - set(keys))
            raise ConfigError(
                f"state dict {index} does not have the keys of state dict 0 (missing {missing[:5]}, "
                f"extra {extra[:5]}); merge state dicts of the same model"
            )
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [state[key] for state in task_tensors]
        _check_shapes(tensors, key)
        merged[key] = merge_one(tensors, values)
    return merged


def _trimmed_merge(
    task_tensors: Sequence[_T],
    weights: Weights,
    density: float,
    trim: PruneMethod,
    sign_method: str | None,
    generator: torch.Generator | None = None,
) -> _T:
    """Trim every task tensor (``"magnitude"``, or DARE's rescaled ``"random"`` drop), then either the weighted
    sum (``sign_method=None``) or TIES' sign election and disjoint mean."""
    density = check_density(density)
    elect = None if sign_method is None else check_sign_method(sign_method)

    def merge_one(tensors: Sequence[torch.Tensor], values: list[float]) -> torch.Tensor:
        # Lazily, one task at a time: the same random draws, in the same order, as PEFT.
        trimmed = (prune(t, density, trim, rescale=True, generator=generator) for t in tensors)
        return _weighted_sum(trimmed, values) if elect is None else _ties_merge(list(trimmed), values, elect)

    return _merge(task_tensors, weights, merge_one)


def task_arithmetic(task_tensors: Sequence[_T], weights: Weights) -> _T:
    """Task arithmetic: Σᵢ wᵢ·τᵢ.

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task (a list or a 1-D tensor); negative weights subtract a task.

    Returns:
        The merged tensor (or state dict), in the dtype of the first task tensor.

    Raises:
        ConfigError: no tasks, a weight count that differs from the task count, a non-finite weight, or
            mismatched shapes/keys.
    """
    return _merge(task_tensors, weights, _weighted_sum)


def magnitude_prune(task_tensors: Sequence[_T], weights: Weights, density: float) -> _T:
    """Trim each task tensor to its ``density`` largest-magnitude entries, then Σᵢ wᵢ·trim(τᵢ).

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task.
        density: fraction of entries each task keeps, in (0, 1].

    Returns:
        The merged tensor (or state dict).

    Raises:
        ConfigError: ``density`` outside (0, 1], a wrong weight count or a non-finite weight, or mismatched shapes/keys.
    """
    return _trimmed_merge(task_tensors, weights, density, "magnitude", None)


def ties(
    task_tensors: Sequence[_T], weights: Weights, density: float, majority_sign_method: SignMethod = "total"
) -> _T:
    """TIES merging: trim by magnitude, elect a sign per entry, disjoint mean of the weighted tasks.

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task, applied before the disjoint mean (as in PEFT).
        density: fraction of entries each task keeps, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"`` (see :func:`calculate_majority_sign_mask`).

    Returns:
        The merged tensor (or state dict).

    Raises:
        ConfigError: ``density`` outside (0, 1], unknown ``majority_sign_method``, a wrong weight count or a
            non-finite weight, or mismatched shapes/keys.
    """
    return _trimmed_merge(task_tensors, weights, density, "magnitude", majority_sign_method)


def dare_linear(
    task_tensors: Sequence[_T], weights: Weights, density: float, *, generator: torch.Generator | None = None
) -> _T:
    """DARE then task arithmetic: drop entries with probability 1 − density, rescale by 1/density, Σᵢ wᵢ·τ̂ᵢ.

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task.
        density: keep probability, in (0, 1].
        generator: random source; ``None`` uses the global generator, so ``torch.manual_seed(s)`` before the
            call reproduces PEFT's ``dare_linear`` on the same tensors.

    Returns:
        The merged tensor (or state dict).

    Raises:
        ConfigError: ``density`` outside (0, 1], a wrong weight count or a non-finite weight, or mismatched shapes/keys.
    """
    return _trimmed_merge(task_tensors, weights, density, "random", None, generator)


def dare_ties(
    task_tensors: Sequence[_T],
    weights: Weights,
    density: float,
    majority_sign_method: SignMethod = "total",
    *,
    generator: torch.Generator | None = None,
) -> _T:
    """DARE then TIES: random drop with rescale, sign election, disjoint mean of the weighted tasks.

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task.
        density: keep probability, in (0, 1].
        majority_sign_method: ``"total"`` or ``"frequency"``.
        generator: random source; ``None`` uses the global generator (PEFT-compatible under a seed).

    Returns:
        The merged tensor (or state dict).

    Raises:
        ConfigError: ``density`` outside (0, 1], unknown ``majority_sign_method``, a wrong weight count or a
            non-finite weight, or mismatched shapes/keys.
    """
    return _trimmed_merge(task_tensors, weights, density, "random", majority_sign_method, generator)
