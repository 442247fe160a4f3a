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
(``{name: tensor}``, merged key by key) and return the task tensors' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, TypeVar

import torch

from peftkit.errors import ConfigError

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

SignMethod = Literal["total", "frequency"]
PruneMethod = Literal["magnitude", "random"]
Weights = torch.Tensor | Sequence[float]
StateDict = dict[str, torch.Tensor]
_T = TypeVar("_T", torch.Tensor, StateDict)

_SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------------------------------- checks


def check_density(density: float) -> float:
    """Validate a density (the fraction of entries kept).

    Args:
        density: the value to check.

    Returns:
        ``density`` as a float.

    Raises:
        ConfigError: ``density`` is not a number in (0, 1].
    """
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0.0 < density <= 1.0:
        raise ConfigError(
            f"density={density!r} is outside (0, 1]: it is the fraction of entries kept, "
            "e.g. density=0.5 keeps half (1.0 keeps all)"
        )
    return float(density)


def check_sign_method(method: str) -> SignMethod:
    """Validate a majority-sign method name.

    Raises:
        ConfigError: ``method`` is not ``"total"`` or ``"frequency"``.
    """
    if method not in _SIGN_METHODS:
        raise ConfigError(
            f"majority_sign_method={method!r} is unknown; use 'total' (sign of the summed values) "
            "or 'frequency' (sign held by most tasks)"
        )
    return method  # type: ignore[return-value]


def _weight_list(weights: Weights, count: int) -> list[float]:
    values = weights.detach().reshape(-1).tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if len(values) != count:
        raise ConfigError(
            f"got {len(values)} weights for {count} task tensors: pass exactly one weight per task "
            f"(weights={values!r})"
        )
    return [float(w) for w in values]


def _check_shapes(tensors: Sequence[torch.Tensor], key: str | None = None) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        where = f" for key {key!r}" if key is not None else ""
        raise ConfigError(
            f"task tensors{where} have different shapes {sorted(shapes)}; they must all have one shape"
        )


# --------------------------------------------------------------------------------------------- helpers


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude and zero the rest.

    Ties at the threshold are broken by ``torch.topk`` exactly as PEFT does, so both keep the same entries.

    Args:
        tensor: the tensor to trim.
        density: fraction of entries kept, in (0, 1].

    Returns:
        A new tensor of ``tensor``'s shape and dtype.
    """
    flat = tensor.reshape(-1)
    k = int(density * flat.numel())
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop), optionally rescaled by ``1/density``.

    Args:
        tensor: the tensor to drop entries from.
        density: keep probability, in (0, 1].
        rescale: divide the survivors by ``density`` so the expectation equals ``tensor``.
        generator: random source; the global torch generator when ``None`` (as in PEFT).

    Returns:
        A new tensor of ``tensor``'s shape and dtype.
    """
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(
    tensor: torch.Tensor,
    density: float,
    method: PruneMethod,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trim a tensor by magnitude or drop random entries; ``density == 1`` returns it unchanged.

    Args:
        tensor: the tensor to prune.
        density: fraction of entries kept, in (0, 1].
        method: ``"magnitude"`` (keep the largest) or ``"random"`` (keep each with probability density).
        rescale: with ``"random"``, divide survivors by ``density``.
        generator: random source for ``"random"``.

    Returns:
        The pruned tensor (``tensor`` itself when ``density == 1``, drawing no random numbers, like PEFT).

    Raises:
        ConfigError: ``density`` outside (0, 1] or an unknown ``method``.
    """
    density = check_density(density)
    if method not in ("magnitude", "random"):
        raise ConfigError(f"prune method={method!r} is unknown; use 'magnitude' or 'random'")
    if density == 1.0:
        return tensor
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    return random_pruning(tensor, density, rescale=rescale, generator=generator)


def calculate_majority_sign_mask(tensor: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES' sign election over task tensors stacked on dimension 0.

    Args:
        tensor: shape ``(n_tasks, …)``.
        method: ``"total"`` elects sgn(Σᵢ τᵢ), ``"frequency"`` elects sgn(Σᵢ sgn τᵢ); a tie elects +.

    Returns:
        Boolean mask of ``tensor``'s shape, true where an entry has the elected sign (never for zeros).

    Raises:
        ConfigError: unknown ``method``.
    """
    check_sign_method(method)
    sign = tensor.sign()
    votes = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == _elected(votes)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean: average each entry over the tasks that agree with the elected sign.

    Args:
        task_tensors: weighted task tensors stacked on dimension 0.
        majority_sign_mask: the mask from :func:`calculate_majority_sign_mask`.

    Returns:
        The merged tensor (an entry no task keeps is 0).
    """
    kept = (task_tensors * majority_sign_mask).sum(dim=0)
    return kept / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _elected(votes: torch.Tensor) -> torch.Tensor:
    return torch.where(votes >= 0, 1, -1).to(votes.dtype)


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
    elected = _elected(votes)
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


def task_arithmetic(task_tensors: Sequence[_T], weights: Weights) -> _T:
    """Task arithmetic: Σᵢ wᵢ·τᵢ.

    Args:
        task_tensors: tensors of one shape, or state dicts with the same keys.
        weights: one weight per task (a list or a 1-D tensor); negative weights subtract a task.

    Returns:
        The merged tensor (or state dict), in the dtype of the first task tensor.

    Raises:
        ConfigError: no tasks, a weight count that differs from the task count, or mismatched shapes/keys.
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
        ConfigError: ``density`` outside (0, 1], a wrong weight count, or mismatched shapes/keys.
    """
    density = check_density(density)

    def merge_one(tensors: Sequence[torch.Tensor], values: list[float]) -> torch.Tensor:
        return _weighted_sum((prune(t, density, "magnitude") for t in tensors), values)

    return _merge(task_tensors, weights, merge_one)


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
        ConfigError: ``density`` outside (0, 1], unknown ``majority_sign_method``, a wrong weight count,
            or mismatched shapes/keys.
    """
    density = check_density(density)
    method = check_sign_method(majority_sign_method)

    def merge_one(tensors: Sequence[torch.Tensor], values: list[float]) -> torch.Tensor:
        return _ties_merge([prune(t, density, "magnitude") for t in tensors], values, method)

    return _merge(task_tensors, weights, merge_one)


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
        ConfigError: ``density`` outside (0, 1], a wrong weight count, or mismatched shapes/keys.
    """
    density = check_density(density)

    def merge_one(tensors: Sequence[torch.Tensor], values: list[float]) -> torch.Tensor:
        # Drop and accumulate one task at a time: the same random draws, in the same order, as PEFT.
        return _weighted_sum(
            (prune(t, density, "random", rescale=True, generator=generator) for t in tensors), values
        )

    return _merge(task_tensors, weights, merge_one)


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
        ConfigError: ``density`` outside (0, 1], unknown ``majority_sign_method``, a wrong weight count,
            or mismatched shapes/keys.
    """
    density = check_density(density)
    method = check_sign_method(majority_sign_method)

    def merge_one(tensors: Sequence[torch.Tensor], values: list[float]) -> torch.Tensor:
        dropped = [prune(t, density, "random", rescale=True, generator=generator) for t in tensors]
        return _ties_merge(dropped, values, method)

    return _merge(task_tensors, weights, merge_one)
