"""DoRA's weight norms, magnitudes and merging, shared by its layers (:mod:`peftkit.methods.dora` has the formula).

The norm ‖W + s·BA‖ is detached from the graph (paper §4.3, as in Hugging Face PEFT): gradients reach m, A and B,
not through ‖·‖. m starts at ‖W + s·BA‖, so a fresh adapter leaves outputs unchanged. The row norms are computed
without the dense B@A::

    ‖W + sBA‖²ᵢ = ‖Wᵢ‖² + 2s·Σ_k Bᵢₖ (WAᵀ)ᵢₖ + s²·Σ_k (B AAᵀ)ᵢₖ Bᵢₖ

with ‖W‖² cached while the frozen weight is unchanged, and the whole norm cached until A, B or W change (in
evaluation it is computed once). A change is an in-place write (which moves a tensor's version counter) or an
optimizer step (:data:`peftkit.core.epoch.STEPS`: fused optimizers write without moving the counters); a write
through ``.data`` is neither, so change adapter tensors in place under ``torch.no_grad()`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.epoch import STEPS
from peftkit.core.registry import DEQUANTIZERS
from peftkit.errors import MergeError
from peftkit.methods.lora_layers import LoRALayer


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


class _DoRAMixin(LoRALayer):
    """What the DoRA layers share: magnitudes, cached detached norms, merging and unmerging.

    Placed before its LoRA layer class (``class DoRALinear(_DoRAMixin, LoRALinear)``), so ``super()`` here is that
    class: a plain LoRA adapter on the layer (no magnitude) merges as LoRA does. Each layer supplies its own math:
    ``_oriented`` and ``_factors`` (for the cached norms), and ``_channel_norms``, ``_per_row`` and ``_dora_factor``
    for the base weight in its stored shape (defaults: an (out, in) weight with one magnitude per row).
    """

    lora_magnitude_vector: nn.ParameterDict

    takes_plain_lora: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self._norm_cache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
        self._w_sq: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._merge_norms: dict[str, torch.Tensor] = {}

    @classmethod
    def upgrade(cls, layer: LoRALayer) -> _DoRAMixin:
        """Turn a plain LoRA layer into this DoRA layer class in place (same object, its adapters kept as plain
        LoRA adapters), so that a DoRA adapter can be added next to them."""
        layer.__class__ = cls
        dora = cast(_DoRAMixin, layer)
        dora._init_dora()
        return dora

    # The weight the norm is taken over, oriented (rows the magnitude scales, ·), and the factors so that
    # its update is scale · B A.
    def _oriented(self) -> torch.Tensor:
        raise NotImplementedError

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # The same for a weight in its stored shape (``_base_weight``): the norm per magnitude entry, and a
    # per-entry vector shaped to scale the weight.
    def _channel_norms(self, weight: torch.Tensor) -> torch.Tensor:
        norms: torch.Tensor = weight.norm(dim=1)  # Tensor.norm is untyped
        return norms

    def _per_row(self, factor: torch.Tensor) -> torch.Tensor:
        return factor[:, None]

    def _dora_working_weight(self) -> torch.Tensor:
        """The base weight a DoRA merge or unmerge reads and rewrites (fp32 over half-precision bases)."""
        return self._working_weight()

    def _base_key(self) -> tuple[Any, ...]:
        base: nn.Module = self.base_layer
        if base._modules:  # a composite base (some quantized layers): every tensor below it
            tensors = [*base.parameters(), *base.buffers()]
        else:  # the common case, without the generators' overhead (this runs on every forward)
            tensors = [t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None]
        return (STEPS.value, *((t.data_ptr(), t._version) for t in tensors))

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
        # A norm computed under torch.inference_mode is an inference tensor, which a later training forward could
        # not save for backward: the mode is part of the key.
        base = (*self._base_key(), torch.is_inference_mode_enabled())
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
        """``m/‖W + s·BA‖`` (detached) for a forward without gradients. The fused path caches it per layer
        (``lora_kernels.fused_dora_forward``), so decoding a token costs no extra kernel for it."""
        with torch.no_grad():
            return magnitude.detach() / self.weight_norm(name)

    def _gain(self, name: str) -> torch.Tensor:
        """``g = m/‖W + s·BA‖`` shaped to scale the layer's output (gradients reach m, not the detached norm)."""
        return cast(torch.Tensor, self.lora_magnitude_vector[name]) / self.weight_norm(name)

    def _add_updates(self, x: torch.Tensor, result: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``result`` plus each applied adapter's term, for layers whose A and B are modules (linear, conv).

        A DoRA adapter adds ``(g−1)·Wx + g·s·BA·dropout(x)`` (``base_out`` is ``Wx``, without the bias: dropout acts
        on the adapter branch only), so the output is ``g⊙(Wx + s·BA·dropout(x)) + b``; a plain LoRA adapter on the
        same layer adds its own update.
        """
        # Rounded as in LoRALinear.forward: once, after the updates, except on a quantized base.
        quantized = DEQUANTIZERS.lookup(type(self.base_layer)) is not None
        out = result
        for name in self._applied():
            update = self._module_update(name, x)
            if name in self.lora_magnitude_vector:
                g = self._gain(name)
                update = (g - 1) * base_out.to(update.dtype) + g * update
            out = out + (update.to(result.dtype) if quantized else update)
        return out.to(result.dtype)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._norm_cache.pop(name, None)
        self._merge_norms.pop(name, None)

    def _forget_norms(self) -> None:
        # A re-quantized base gets new buffers whose addresses may repeat older ones: drop the cached norms
        # rather than trust the (data_ptr, version) key across merges.
        self._norm_cache.clear()
        self._w_sq = None

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
        return (magnitude / norm).detach()

    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W, in the base weight's shape: the change merging adapter ``name`` makes to the current base weight."""
        if name not in self.lora_magnitude_vector:
            return super().delta_weight(name)
        W = self._base_weight().detach()
        combined = W + super().delta_weight(name).to(W.dtype)
        factor = self._dora_factor(name, self._channel_norms(combined)).to(W.dtype)
        return self._per_row(factor) * combined - W

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        """Also refuse a merge that would change what a DoRA adapter computed in ``forward`` sees.

        A DoRA adapter's update depends on the base weight (its norm and ``(g−1)·Wx``), so once another adapter is
        merged into that weight the adapter computes something else. Merging active adapters keeps the outputs only
        if the layer's one applied DoRA adapter merges first (``merge`` orders it so) and none stays applied beside
        the merge. (Merging an inactive adapter changes the outputs on purpose: applied ones then build on it.)
        """
        super().check_merge(names, where)
        applied = self._applied()
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        dora = [n for n in applied if n in self.lora_magnitude_vector]
        if set(todo) & set(applied) and dora and not (len(dora) == 1 and dora[0] in todo):
            raise MergeError(
                f"at {where or type(self.base_layer).__name__}: DoRA adapter(s) {dora} compute their update from "
                f"the base weight, which merging {todo} changes, so the merged layer would compute other outputs "
                "than it does now; nothing was merged. Merge each layer's one active DoRA adapter together with "
                "the adapters active beside it (activate one DoRA adapter with pk.set_adapter), or keep them unmerged"
            )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)  # lora_bias needs a base bias; DoRA adapters and what merges beside them
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        applied = self._applied()
        # An applied DoRA adapter first: it is computed from the unmerged weight, the others are not.
        todo.sort(key=lambda n: not (n in applied and n in self.lora_magnitude_vector))
        self._merge_in_order(todo, safe, where)

    def _merge_in_order(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        for name in names:
            if name not in self.lora_magnitude_vector:
                super()._merge_one(name, safe, where)
                continue
            W = self._dora_working_weight()
            combined = W + super().delta_weight(name).to(W.dtype)  # the LoRA update s·BA, in W's shape
            norm = self._channel_norms(combined)
            merged = self._per_row(self._dora_factor(name, norm).to(W.dtype)) * combined
            if safe:
                self.check_finite(merged, where or type(self.base_layer).__name__, name)
            self._write_merged(name, merged, where)  # a quantized base keeps and logs its error
            self._merge_norms[name] = norm  # unmerging needs the norm of the weight before merging
            self._forget_norms()
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        # A DoRA merge scales the weight it finds, so adapters come out in the reverse of the merge order: those
        # merged after the first one named come out too, and go back in afterwards.
        wanted = [n for n in self.merged_adapters if names is None or n in names]
        if not wanted:
            return
        later = self.merged_adapters[self.merged_adapters.index(wanted[0]):]
        for name in reversed(later):
            if name not in self._merge_norms:
                super().unmerge([name])
                continue
            W = self._dora_working_weight()
            factor = self._per_row(self._dora_factor(name, self._merge_norms.pop(name)).to(W.dtype))
            self._write_unmerged(name, W / factor - super().delta_weight(name).to(W.dtype))
            self._forget_norms()
            self.merged_adapters.remove(name)
        self._merge_in_order([n for n in later if n not in wanted])
