"""DoRA's weight norms and magnitudes, shared by its layers (:mod:`peftkit.methods.dora` has the formula).

The norm ‖W + s·BA‖ is detached from the graph (paper §4.3, as in Hugging Face PEFT): gradients reach m, A and B,
not through ‖·‖. m starts at ‖W + s·BA‖, so a fresh adapter leaves outputs unchanged. The row norms are computed
without the dense B@A::

    ‖W + sBA‖²ᵢ = ‖Wᵢ‖² + 2s·Σ_k Bᵢₖ (WAᵀ)ᵢₖ + s²·Σ_k (B AAᵀ)ᵢₖ Bᵢₖ

with ‖W‖² cached while the frozen weight is unchanged, and the whole norm cached until A, B or W change (in
evaluation it is computed once).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn


def row_norms(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
              w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + scale·B A‖ per row of W (out × in), from W Aᵀ and A Aᵀ instead of the dense B A.

    Args:
        W: (out, in); A: (r, in); B: (out, r); w_sq: ‖W‖² per row if already known.
    """
    W = W.to(A.dtype)
    if w_sq is None:
        w_sq = W.pow(2).sum(1)
    cross = (B * (W @ A.T)).sum(1)
    lora_sq = ((B @ (A @ A.T)) * B).sum(1)
    return (w_sq + 2 * scale * cross + scale * scale * lora_sq).clamp_min(0).sqrt()


class _DoRAMixin:
    """Magnitudes, cached detached norms and merging shared by the DoRA layers."""

    lora_magnitude_vector: nn.ParameterDict
    scaling: dict[str, float]
    merged_adapters: list[str]
    base_layer: nn.Module

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self._norm_cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
        self._w_sq: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._factor_cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}

    # The weight the norm is taken over, oriented (rows the magnitude scales, ·), and the factors so that
    # its update is scale · B A.
    def _oriented(self) -> torch.Tensor:
        raise NotImplementedError

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _base_key(self) -> tuple[Any, ...]:
        base: nn.Module = self.base_layer
        if base._modules:  # a composite base (some quantized layers): every tensor below it
            tensors = [*base.parameters(), *base.buffers()]
        else:  # the common case, without the generators' overhead (this runs on every forward)
            tensors = [t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def add_magnitude(self, name: str) -> None:
        """Add adapter ``name``'s magnitude, initialised to the current norms (outputs unchanged)."""
        A, B = self._factors(name)
        with torch.no_grad():
            norm = row_norms(self._oriented().detach(), A.detach(), B.detach(), self.scaling[name])
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(A.dtype))

    def base_norms(self) -> torch.Tensor:
        """‖W₀‖ per row of the current base weight (detached, in fp32 or the base's wider dtype): with a zero
        update, the magnitude that leaves the layer unchanged. Adapter arithmetic measures magnitudes from it."""
        with torch.no_grad():
            W = self._oriented().detach()
            norms: torch.Tensor = W.to(torch.promote_types(W.dtype, torch.float32)).norm(dim=1)
        return norms

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W + s·BA‖ per row, detached; recomputed only when W, A or B changed."""
        A, B = self._factors(name)
        base = self._base_key()
        key = (base, A.data_ptr(), A._version, B.data_ptr(), B._version, self.scaling[name], A.device, A.dtype)
        hit = self._norm_cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            W = self._oriented().detach()
            if self._w_sq is None or self._w_sq[0] != base:
                self._w_sq = (base, W.to(A.dtype).pow(2).sum(1))
            norm = row_norms(W, A.detach(), B.detach(), self.scaling[name], self._w_sq[1])
        self._norm_cache[name] = (key, norm)
        return norm

    def inference_factor(self, name: str, magnitude: torch.Tensor) -> torch.Tensor:
        """``m/‖W + s·BA‖`` (detached) for a forward without gradients, recomputed only when the norm or the
        magnitude changed: decoding a token then costs no extra kernel for it."""
        norm = self.weight_norm(name)
        key = (magnitude.data_ptr(), magnitude._version)
        hit = self._factor_cache.get(name)
        if hit is not None and hit[0][0] is norm and hit[0][1:] == key:
            return hit[1]
        with torch.no_grad():
            factor = magnitude.detach() / norm
        self._factor_cache[name] = ((norm, *key), factor)  # a recomputed norm is a new tensor object
        return factor

    def _delete_dora(self, name: str) -> None:
        self._norm_cache.pop(name, None)
        self._merge_norms.pop(name, None)
        self._factor_cache.pop(name, None)

    def _forget_norms(self) -> None:
        # A re-quantized base gets new buffers whose addresses may repeat older ones: drop the cached norms
        # rather than trust the (data_ptr, version) key across merges.
        self._norm_cache.clear()
        self._factor_cache.clear()
        self._w_sq = None

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
        return (magnitude / norm).detach()
