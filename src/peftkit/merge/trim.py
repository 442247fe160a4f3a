"""Trimming and sign election: the building blocks of TIES and DARE (see :mod:`peftkit.merge.merge_utils`).

With density d ∈ (0, 1]:

- magnitude trim: trim_d(τ) keeps the ⌊d·numel⌋ entries of largest |·| and zeroes the rest;
- DARE's drop (Yu et al., 2023, arXiv:2311.03099): τ̂ = m ⊙ τ / d with m ~ Bernoulli(d);
- TIES' sign election (Yadav et al., 2023, arXiv:2306.01708): γ = sgn(Σᵢ τᵢ) ("total") or
  sgn(Σᵢ sgn τᵢ) ("frequency"), and the disjoint mean over the tasks whose sign agrees with γ.

Each function matches Hugging Face PEFT's ``peft.utils.merge_utils`` function of the same name.
"""

from __future__ import annotations

from typing import Literal, cast

import torch

from peftkit.errors import ConfigError

SignMethod = Literal["total", "frequency"]
PruneMethod = Literal["magnitude", "random"]

_SIGN_METHODS = ("total", "frequency")


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
    return cast(SignMethod, method)


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
    return sign == elected_sign(votes)


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


def elected_sign(votes: torch.Tensor) -> torch.Tensor:
    """+1 where ``votes`` ≥ 0 (a tie elects +), else −1, in ``votes``' dtype."""
    return torch.where(votes >= 0, 1, -1).to(votes.dtype)
