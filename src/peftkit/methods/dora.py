"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is split into a trainable magnitude m (one value per output row) and a direction::

    W' = m · (W + s·BA) / ‖W + s·BA‖          (row norms; s = α/r, or α/√r with rsLoRA)
    y  = W'x = (m/‖·‖ − 1) · W x  +  (m/‖·‖) · s·BAx  +  W x

The norm is detached from the graph (paper §4.3, as in Hugging Face PEFT): gradients reach m, A and B, not
through ‖·‖. m starts at ‖W + s·BA‖, so a fresh adapter leaves outputs unchanged. The row norms are computed
without the dense B@A::

    ‖W + sBA‖²ᵢ = ‖Wᵢ‖² + 2s·Σ_k Bᵢₖ (WAᵀ)ᵢₖ + s²·Σ_k (B AAᵀ)ᵢₖ Bᵢₖ

with ‖W‖² cached while the frozen weight is unchanged, and the whole norm cached until A, B or W change (in
evaluation it is computed once). On ``nn.Embedding`` (weight E, vocab × dim) the norm and magnitude are per
embedding dimension, the columns of E, as in HF PEFT. On ``nn.Conv1d/2d/3d`` (weight out × in × kernel) they are
per output channel, the norm taken over all the other dims, and the layer output is
``(g − 1)·conv(x, W) + g·s·B(A(x)) + conv(x, W) + b``; HF PEFT stores that magnitude with singleton dims,
``(1, out, 1, …)``, and so does peftkit. On disk: HF PEFT's LoRA config with ``use_dora: true``
and the magnitude under ``lora_magnitude_vector``.

Dropout (``dropout > 0``, in training) acts on the adapter branch's input only::

    y = g ⊙ (W x + s·B A dropout(x)) + b,        g = m / ‖W + s·BA‖   (detached)

HF PEFT feeds the dropped-out input to the base term as well (``(g−1) ⊙ W dropout(x)``): a second full base
matmul per layer, and noise on the frozen weight's contribution. Here a layer costs one base matmul with or
without dropout, and dropout means what it means for LoRA (the adapter sees a dropped-out input), rescaled by g.
With dropout 0, and in evaluation, both are ``g ⊙ (W x + s·BAx) + b``: outputs and gradients equal HF PEFT's
exactly, and adapters move between the two libraries unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.registry import LINEAR_KINDS, TypeRegistry, linear_kind
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods import lora_groups
from peftkit.methods.lora import LORA_VARIANTS, LoRA
from peftkit.methods.lora_layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear


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


class DoRALinear(_DoRAMixin, LoRALinear):
    """DoRA on a linear-like layer (``nn.Linear``, GPT-2 ``Conv1D``, quantized linears via ``kind.weight``)."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def _oriented(self) -> torch.Tensor:
        return self.kind.weight(self.base_layer)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor_weights(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._delete_dora(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # One DoRA adapter on a frozen nn.Linear: the whole formula in one autograd node (lora_kernels), shared
        # with the sibling projections that read the same input (lora_groups).
        fused = None if args or kwargs else lora_groups.fused_forward(self, x, dora=True)
        if fused is not None:
            return fused
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        base_out = result if bias is None else result - bias  # W x: the base term never sees dropout
        out = result
        for name in self._applied():
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            h = x.to(cast(torch.Tensor, A.weight).dtype)
            if name not in self.lora_magnitude_vector:  # a plain LoRA adapter on the same layer
                update = B(A(drop(h))) if self.dropout_position[name] == "pre" else drop(B(A(h)))
                out = out + (update * self.scaling[name]).to(out.dtype)
                continue
            # Dropout on the adapter branch only: g⊙(Wx + s·BA·dropout(x)) + b (module docstring).
            g = self.lora_magnitude_vector[name] / self.weight_norm(name)
            update = (g - 1) * base_out.to(h.dtype) + g * (B(A(drop(h))) * self.scaling[name])
            out = out + update.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W: the change merging adapter ``name`` makes to the current base weight."""
        if name not in self.lora_magnitude_vector:
            return super().delta_weight(name)
        W = self._base_weight().detach()
        lora = super().delta_weight(name).to(W.dtype)
        factor = self._dora_factor(name, (W + lora).norm(dim=1)).to(W.dtype)
        return factor[:, None] * (W + lora) - W

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            if name not in self.lora_magnitude_vector:
                super().merge([name], safe, where)
                continue
            W = self._working_weight()  # fp32 over half/quantized bases: one rounding (or re-quantization)
            combined = W + LoRALinear.delta_weight(self, name).to(W.dtype)
            norm = combined.norm(dim=1)
            merged = self._dora_factor(name, norm).to(W.dtype)[:, None] * combined
            if safe:
                self.check_finite(merged, where or type(self.base_layer).__name__, name)
            self._write_merged(name, merged, where)  # a quantized base keeps and logs its error
            self._merge_norms[name] = norm  # unmerging needs the norm of the weight before merging
            self._forget_norms()
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        for name in [n for n in reversed(self.merged_adapters) if names is None or n in names]:
            if name not in self._merge_norms:
                super().unmerge([name])
                continue
            W = self._working_weight()
            factor = self._dora_factor(name, self._merge_norms.pop(name)).to(W.dtype)
            self._write_merged(name, W / factor[:, None] - LoRALinear.delta_weight(self, name).to(W.dtype), "")
            self.merge_errors.pop(name, None)
            self._forget_norms()
            self.merged_adapters.remove(name)


class DoRAEmbedding(_DoRAMixin, LoRAEmbedding):
    """DoRA on ``nn.Embedding``: magnitude and norm per embedding dimension (the columns of the table E).

    ``E' = (E + s·(BA)ᵀ) · diag(m / ‖columns‖)``, so ``y = g ⊙ (E[x] + s·Aᵀ[x] Bᵀ)`` with ``g = m / ‖·‖``.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    base_layer: nn.Embedding  # LoRAEmbedding's, over the mixin's nn.Module

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def _oriented(self) -> torch.Tensor:
        return self.base_layer.weight.T  # (dim, vocab): rows are embedding dimensions, update s·B A

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors(name)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._delete_dora(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        base = result
        for name in self._applied():
            A, B = self.factors(name)
            lora = (self.embed(x, A.T) @ B.T) * self.scaling[name]
            if name not in self.lora_magnitude_vector:
                result = result + lora.to(result.dtype)
                continue
            g = self.lora_magnitude_vector[name] / self.weight_norm(name)
            result = result + ((g - 1) * base.to(lora.dtype) + g * lora).to(result.dtype)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().delta_weight(name)
        W = self._base_weight().detach()
        combined = W + super().delta_weight(name).to(W.dtype)
        factor = self._dora_factor(name, combined.norm(dim=0)).to(W.dtype)
        return combined * factor[None, :] - W

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            if name not in self.lora_magnitude_vector:
                super().merge([name], safe, where)
                continue
            W = self._base_weight().detach()
            combined = W + LoRAEmbedding.delta_weight(self, name).to(W.dtype)
            norm = combined.norm(dim=0)
            merged = combined * self._dora_factor(name, norm).to(W.dtype)[None, :]
            if safe:
                self.check_finite(merged, where or "Embedding", name)
            self._set_base_weight(merged)
            self._merge_norms[name] = norm
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        for name in [n for n in reversed(self.merged_adapters) if names is None or n in names]:
            if name not in self._merge_norms:
                super().unmerge([name])
                continue
            W = self._base_weight().detach()
            factor = self._dora_factor(name, self._merge_norms.pop(name)).to(W.dtype)
            self._set_base_weight(W / factor[None, :] - LoRAEmbedding.delta_weight(self, name).to(W.dtype))
            self.merged_adapters.remove(name)


class DoRAConv(_DoRAMixin, LoRAConv):
    """DoRA on ``nn.Conv1d/2d/3d`` with ``groups=1``: magnitude and norm per output channel.

    With W (out, in, *kernel) flattened to rows (out, in·∏kernel), the norm is ``row_norms`` of
    ``W + s·B A`` (A the base-kernel convolution, B the 1×1 one) and ``y = g ⊙ (conv(x, W) + s·B(A(drop(x)))) + b``
    with ``g = m / ‖·‖`` per output channel (HF PEFT's ``_DoraConvNdLayer``; dropout as in the module docstring).
    The magnitude is stored as HF PEFT stores it, shape ``(1, out, 1, …)`` with ``W.dim()`` dims.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._init_dora()

    def _oriented(self) -> torch.Tensor:
        return self._base_weight().flatten(1)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.factor_weights(name)
        return A.flatten(1), B.flatten(1)

    def _per_channel(self, t: torch.Tensor, over: str) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over the ``"weight"`` (out, in, *k) or an ``"output"``
        (N, out, *S) or unbatched (out, *S)."""
        ones = self._base_weight().dim() - (1 if over == "weight" else 2)
        return t.reshape(-1, *([1] * ones))

    def _magnitude_shape(self) -> tuple[int, ...]:
        weight = self._base_weight()
        return (1, weight.shape[0], *([1] * (weight.dim() - 2)))

    def add_magnitude(self, name: str) -> None:
        """Add adapter ``name``'s magnitude ‖W + s·BA‖ in HF PEFT's shape ``(1, out, 1, …)`` (outputs unchanged)."""
        super().add_magnitude(name)
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name]).detach()
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude.reshape(self._magnitude_shape()))

    def base_norms(self) -> torch.Tensor:
        """‖W₀‖ per output channel, shaped like the magnitude (see ``_DoRAMixin.base_norms``)."""
        return super().base_norms().reshape(self._magnitude_shape())

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
        return (magnitude.reshape(-1) / norm).detach()  # (out,): m / ‖·‖ per output channel

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._delete_dora(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        # conv(x, W), without the bias: the base term never sees dropout
        base_out = result if bias is None else result - self._per_channel(bias, "output")
        out = result
        for name in self._applied():
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            h = x.to(cast(torch.Tensor, A.weight).dtype)
            if name not in self.lora_magnitude_vector:  # a plain LoRA adapter on the same layer
                update = B(A(drop(h))) if self.dropout_position[name] == "pre" else drop(B(A(h)))
                out = out + (update * self.scaling[name]).to(out.dtype)
                continue
            magnitude = cast(torch.Tensor, self.lora_magnitude_vector[name])
            g = self._per_channel(magnitude.reshape(-1) / self.weight_norm(name), "output")  # grad reaches m, not ‖·‖
            update = (g - 1) * base_out.to(h.dtype) + g * (B(A(drop(h))) * self.scaling[name])
            out = out + update.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W (out, in, *kernel): the change merging adapter ``name`` makes to the current base weight."""
        if name not in self.lora_magnitude_vector:
            return super().delta_weight(name)
        W = self._base_weight().detach()
        combined = W + super().delta_weight(name).to(W.dtype)
        factor = self._dora_factor(name, combined.flatten(1).norm(dim=1)).to(W.dtype)
        return self._per_channel(factor, "weight") * combined - W

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            if name not in self.lora_magnitude_vector:
                super().merge([name], safe, where)
                continue
            W = self._working_weight()  # fp32 over a half-precision base: one rounding, at the end
            combined = W + LoRAConv.delta_weight(self, name).to(W.dtype)
            norm = combined.flatten(1).norm(dim=1)
            merged = self._per_channel(self._dora_factor(name, norm).to(W.dtype), "weight") * combined
            if safe:
                self.check_finite(merged, where or type(self.base_layer).__name__, name)
            self._write_merged(name, merged, where)
            self._merge_norms[name] = norm  # unmerging needs the norm of the weight before merging
            self._forget_norms()
            self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        for name in [n for n in reversed(self.merged_adapters) if names is None or n in names]:
            if name not in self._merge_norms:
                super().unmerge([name])
                continue
            W = self._working_weight()
            factor = self._per_channel(self._dora_factor(name, self._merge_norms.pop(name)).to(W.dtype), "weight")
            self._write_merged(name, W / factor - LoRAConv.delta_weight(self, name).to(W.dtype), "")
            self._forget_norms()
            self.merged_adapters.remove(name)


DORA_LAYERS = (DoRALinear, DoRAEmbedding, DoRAConv)

#: Base-layer type → DoRA layer class; linear-like kinds (``LINEAR_KINDS``) fall back to ``DoRALinear``.
DORA_LAYER_TYPES: TypeRegistry[type[LoRALayer]] = TypeRegistry()
DORA_LAYER_TYPES.register(nn.Embedding, DoRAEmbedding)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    DORA_LAYER_TYPES.register(_conv, DoRAConv)


def dora_layer_class(module: nn.Module) -> type[LoRALayer] | None:
    """The DoRA layer class for a base module, or ``None`` if DoRA cannot wrap it."""
    found = DORA_LAYER_TYPES.lookup(type(module))
    if found is not None:
        return found
    return DoRALinear if linear_kind(module) is not None else None


@dataclass
class DoRA(LoRA):
    """DoRA: LoRA's fields, plus a trainable magnitude per output row (HF PEFT: ``use_dora=True``).

    Wraps linear-like layers (``nn.Linear``, GPT-2 ``Conv1D``, quantized linears), ``nn.Embedding`` and
    ``nn.Conv1d/2d/3d`` with ``groups=1``.
    Dropout acts on the adapter branch's input only (``dropout_position="pre"``; see the module docstring).
    """

    shares_A: ClassVar[bool] = False  # each DoRA layer keeps its own A (its norm is taken over W + s·BA)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout_position != "pre":
            raise ConfigError(f"DoRA supports dropout_position='pre' only, got {self.dropout_position!r}")
        if self.shared_A:
            raise ConfigError("DoRA adapters do not share A across projections; shared_A must be empty")

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, LoRALayer):
            return isinstance(module, DORA_LAYERS)
        return dora_layer_class(module) is not None

    def supported_layer_names(self) -> list[str]:
        return sorted(set(LINEAR_KINDS.names()) | set(DORA_LAYER_TYPES.names()))

    def resolve(self, model: nn.Module) -> list[str]:
        """LoRA's target resolution, refusing grouped convolutions before the model is touched.

        Raises:
            UnsupportedLayerError: a target is a convolution with ``groups > 1`` (named, with the fix).
        """
        targets = super().resolve(model)
        for qualname in targets:
            module = model.get_submodule(qualname)
            base = module.base_layer if isinstance(module, LoRALayer) else module
            groups = getattr(base, "groups", 1)
            if isinstance(base, nn.modules.conv._ConvNd) and groups != 1:
                raise UnsupportedLayerError(
                    f"DoRA cannot adapt {qualname!r}: a {type(base).__name__} with groups={groups}; DoRA supports "
                    f"Conv1d/2d/3d with groups=1 only. Leave it out with exclude_modules=[{qualname!r}]"
                )
        return targets

    def layer_class(self, module: nn.Module) -> type[LoRALayer]:
        cls = dora_layer_class(module)
        assert cls is not None  # guaranteed by supports() during target resolution
        return cls

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = super().transform(module, qualname, adapter_name)
        layer.add_magnitude(adapter_name)  # type: ignore[operator]
        return layer

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {**super().to_hf_dict(targets, module_names), "use_dora": True}


LORA_VARIANTS["use_dora"] = DoRA
