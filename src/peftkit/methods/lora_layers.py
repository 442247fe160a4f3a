"""LoRA layers (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

For a frozen layer W₀ and each active adapter with rank r, factors A (r × in) and B (out × r)::

    x ↦ W₀x + s · B A dropout(x),        s = α / r   (rsLoRA, https://arxiv.org/abs/2312.03732: s = α / √r)

B starts at zero, so a fresh adapter leaves the model's output unchanged. With HF PEFT's ``lora_bias`` B also has
a trained bias b (starting at zero) and the update is ``s·(B A dropout(x) + b)``; merging adds ``s·b`` to the base
layer's bias. Linear-like layers (``nn.Linear``, GPT-2 ``Conv1D``, quantized linears) share :class:`LoRALinear`;
embeddings and convolutions have their own layer because their factors are applied differently. Tensor names
follow Hugging Face PEFT exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, LinearKind, TypeRegistry, linear_kind
from peftkit.errors import ConfigError, MergeError
from peftkit.methods import lora_groups, lora_kernels, lora_mixed

logger = logging.getLogger("peftkit")


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """s = α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def init_factor(weight: torch.Tensor, method: str, rank: int) -> None:
    """Initialise a LoRA factor in place (``kaiming`` is HF PEFT's default for A)."""
    with torch.no_grad():
        if method == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif method == "xavier":
            nn.init.xavier_uniform_(weight)
        elif method == "gaussian":
            nn.init.normal_(weight, std=1.0 / rank)
        elif method == "zero":
            nn.init.zeros_(weight)
        else:  # validated by the config; kept as a guard for direct callers
            raise ConfigError(f"unknown init method {method!r}; use kaiming, xavier, gaussian or zero")


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in the base dtype when it is fp32/fp64, and in fp32 over half or quantized bases."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoRALayer(AdapterLayer):
    """What every LoRA layer shares: per-adapter rank, scale and dropout, and weight merging."""

    folds_into_weight = True
    #: Whether plain LoRA adapters may be added next to this layer's own (DoRA layers: a DoRA adapter and a
    #: LoRA one on the same layer, as HF PEFT allows).
    takes_plain_lora: ClassVar[bool] = False
    #: Whether B may carry a trained bias (HF PEFT's ``lora_bias``): B is a module with a bias.
    takes_lora_bias: ClassVar[bool] = False
    #: Whether rows of one batch may go through different adapters here (``pk.mixed_batch``, via ``row_update``).
    mixes_rows: ClassVar[bool] = False
    #: The routing of the ``pk.mixed_batch`` block in progress, set in the instance's ``__dict__`` for its duration.
    _mixed: ClassVar[Any] = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.rank: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: nn.ModuleDict = nn.ModuleDict()
        self.dropout_position: dict[str, str] = {}
        #: adapter name → max abs error re-quantizing the merged weight (quantized bases only)
        self.merge_errors: dict[str, float] = {}

    def _add_common(self, name: str, rank: int, alpha: float, dropout: float, use_rslora: bool,
                    dropout_position: str = "pre") -> None:
        self.rank[name] = rank
        self.scaling[name] = lora_scale(rank, alpha, use_rslora)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position[name] = dropout_position

    def _module_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s·B(A(dropout(x)))`` (``s·dropout(B(A(x)))`` with ``dropout_position="post"``) in the adapter's dtype,
        for an adapter whose A and B are modules (``lora_A``/``lora_B``): the straightforward formula, which every
        fused path is tested against."""
        As, Bs = cast(nn.ModuleDict, self._modules["lora_A"]), cast(nn.ModuleDict, self._modules["lora_B"])
        A, B, drop = As[name], Bs[name], self.lora_dropout[name]
        h = x.to(cast(torch.Tensor, A.weight).dtype)
        update: torch.Tensor = B(A(drop(h))) if self.dropout_position[name] == "pre" else drop(B(A(h)))
        return update * self.scaling[name]

    def row_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s update ``s·ΔW x`` (unrounded) for input ``x``: the whole batch, or the rows of a mixed
        batch that go through it (:mod:`peftkit.methods.lora_mixed`)."""
        return self._module_update(name, x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus each applied adapter's update, rounded to the output's dtype once, after
        the updates (as ``LoRALinear.forward``)."""
        if self._mixed is not None:  # rows through different adapters (pk.mixed_batch)
            return lora_mixed.forward(self, self._mixed, x, args, kwargs)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self._applied():
            result = result + self.row_update(name, x)
        return result.to(dtype)

    def up_bias(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s trained bias on B (HF PEFT's ``lora_bias``), or ``None`` when it has none."""
        Bs = self._modules.get("lora_B")
        B = Bs._modules.get(name) if Bs is not None else None
        return None if B is None else B._parameters.get("bias")

    def _zero_up_bias(self, name: str) -> None:
        bias = self.up_bias(name)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()  # as HF PEFT: a fresh adapter leaves the output unchanged

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for table in (self.rank, self.scaling, self.dropout_position):
            table.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    # Merging goes through the base weight in (out, in) orientation; subclasses say how to read/write it.
    def _base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        raise NotImplementedError

    def _working_weight(self) -> torch.Tensor:
        """The base weight to merge into: fp32 for half-precision and quantized bases (one rounding, at the end)."""
        kind = linear_kind(self.base_layer)
        if kind is not None and kind.merge_weight is not None:  # dequantized in fp32, not via the compute dtype
            return kind.merge_weight(self.base_layer).detach()
        base = self._base_weight().detach()
        return base.float() if base.dtype in (torch.float16, torch.bfloat16) else base

    def _write_merged(self, name: str, weight: torch.Tensor, where: str) -> None:
        """Store a merged weight; a quantized base reports its re-quantization error, which is kept and logged."""
        error = self._set_base_weight(weight)
        if error is not None:
            self.merge_errors[name] = error
            logger.info("merged adapter %r into quantized %s: max abs re-quantization error %.3g", name, where, error)

    def _write_unmerged(self, name: str, weight: torch.Tensor) -> None:
        """Store the weight with adapter ``name`` taken out again; a quantized base logs its re-quantization error."""
        error = self._set_base_weight(weight)
        self.merge_errors.pop(name, None)
        if error is not None:
            logger.info("unmerged adapter %r from a quantized %s: max abs re-quantization error %.3g", name,
                        type(self.base_layer).__name__, error)

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        for name in names:
            if self.up_bias(name) is not None and getattr(self.base_layer, "bias", None) is None:
                kind = type(self.base_layer).__name__
                raise MergeError(
                    f"adapter {name!r} at {where or kind} has lora_bias=True (a trained bias on B), but the base "
                    f"{kind} has no bias to fold it into; nothing was merged. Keep this adapter unmerged, or train "
                    "it with lora_bias=False"
                )

    def _shifted_bias(self, name: str, sign: float) -> torch.Tensor | None:
        """The base bias plus ``sign·s·b`` for adapter ``name``'s bias b on B (in fp32 over half-precision
        biases), or ``None`` when it has none. Nothing is written."""
        b = self.up_bias(name)
        if b is None:
            return None
        bias = cast(torch.Tensor, self.base_layer.bias).detach()  # present: see check_merge
        work = bias.to(torch.promote_types(bias.dtype, torch.float32))
        return work + (sign * self.scaling[name]) * b.detach().to(device=work.device, dtype=work.dtype)

    def _write_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            own = cast(torch.Tensor, self.base_layer.bias)
            with torch.no_grad():
                own.copy_(bias.to(own.dtype))

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)
        for name in names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            self._merge_one(name, safe, where)

    def _merge_one(self, name: str, safe: bool, where: str) -> None:
        """Fold adapter ``name`` (checked, not merged yet) into the base weight."""
        base = self._working_weight()
        merged = base + self.delta_weight(name).to(base.dtype)
        bias = self._shifted_bias(name, 1.0)
        if safe:
            self.check_finite(merged, where or type(self.base_layer).__name__, name)
            if bias is not None:
                self.check_finite(bias, where or type(self.base_layer).__name__, name)
        self._write_merged(name, merged, where)
        self._write_bias(bias)
        self.merged_adapters.append(name)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        todo = [n for n in reversed(self.merged_adapters) if names is None or n in names]
        for name in todo:
            base = self._working_weight()
            self._write_unmerged(name, base - self.delta_weight(name).to(base.dtype))
            self._write_bias(self._shifted_bias(name, -1.0))
            self.merged_adapters.remove(name)


class LoRALinear(LoRALayer):
    """LoRA on a linear-like layer: ``base(x) + s·B(A(dropout(x)))`` (B an ``nn.Linear``, with a bias under
    ``lora_bias``)."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    takes_lora_bias: ClassVar[bool] = True
    mixes_rows: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        kind = linear_kind(base_layer)
        if kind is None:
            raise ConfigError(f"{type(base_layer).__name__} is not a linear-like layer")
        self.in_features = kind.in_features(base_layer)
        self.out_features = kind.out_features(base_layer)
        #: adapter name → A (``nn.Linear`` in → r, or a down-projection shared across projections) and B (r → out)
        self.lora_A: nn.ModuleDict = nn.ModuleDict()
        self.lora_B: nn.ModuleDict = nn.ModuleDict()
        #: adapter name → (A₀, B₀) on the CPU, for adapters whose initialisation moved ``s·B₀A₀`` out of the base
        #: weight (PiSSA, OLoRA: :mod:`peftkit.methods.lora_init`)
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def factor_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r × in) and B (out × r) weights."""
        A, B = self.lora_A[name], self.lora_B[name]
        return cast(torch.Tensor, A.weight), cast(torch.Tensor, B.weight)

    @property
    def kind(self) -> LinearKind:
        """How to read and write the base weight (looked up each time: ``unload`` may swap the base)."""
        kind = linear_kind(self.base_layer)
        assert kind is not None
        return kind

    def add(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
            init_A: str = "kaiming", init_B: str = "zero", dropout_position: str = "pre",
            lora_bias: bool = False) -> None:
        weight = self.kind.weight(self.base_layer)
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=lora_bias, **factory)
        A, B = self.factor_weights(name)
        init_factor(A, init_A, rank)
        init_factor(B, init_B, rank)
        self._zero_up_bias(name)
        self._add_common(name, rank, alpha, dropout, use_rslora, dropout_position)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        from peftkit.methods.lora_init import restore_base

        restore_base(self, name)  # a PiSSA/OLoRA adapter gives back the part of W it took
        super().delete_adapter(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        # s·B is (out × r): scaling it, not the (out × in) product, saves a full pass over the weight.
        A, B = self.factor_weights(name)
        return (B * self.scaling[name]) @ A

    def _base_weight(self) -> torch.Tensor:
        return self.kind.weight(self.base_layer)

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        return self.kind.set_weight(self.base_layer, weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._mixed is not None:  # rows through different adapters (pk.mixed_batch)
            return lora_mixed.forward(self, self._mixed, x, args, kwargs)
        # One adapter on a frozen nn.Linear: base and update in one autograd node (lora_kernels), shared with
        # the sibling projections that read the same input when there are any (lora_groups).
        fused = None if args or kwargs else lora_groups.fused_forward(self, x)
        if fused is not None:
            return fused
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        # As HF PEFT: an update in a wider dtype (fp32 adapters on a bf16 base) is added before the sum is rounded,
        # except on a quantized base, whose bitsandbytes layers there round the update first.
        dtype = result.dtype
        quantized = DEQUANTIZERS.lookup(type(self.base_layer)) is not None
        for name in self._applied():
            A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            A_weight = cast(torch.Tensor, A.weight)
            # A shared down-projection (grouped performant LoRA) computes A(dropout(x)) itself, once per group.
            # The fused update computes s·BA only: an adapter with a bias on B (lora_bias) takes the plain path, as
            # does an activated LoRA adapter, whose B masks its output (lora_activated).
            pre = self.dropout_position[name] == "pre"
            if (type(A) is nn.Linear and type(B) is nn.Linear and pre and type(drop) in (nn.Dropout, nn.Identity)
                    and B.bias is None and lora_kernels.supports(x, A_weight, result)):
                # One fused autograd function (same formula, less saved memory, cheaper dropout masks).
                p = drop.p if isinstance(drop, nn.Dropout) else 0.0
                B_weight = cast(torch.Tensor, B.weight)
                result = lora_kernels.lora_update(result, x, A_weight, B_weight, self.scaling[name], p, drop.training,
                                                  name, self)
                continue
            update = self._module_update(name, x)
            result = result + (update.to(dtype) if quantized else update)
        return result.to(dtype)


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: ``E[x] + s·(Aᵀ[x] Bᵀ)``, A (r × vocab), B (dim × r); both terms times the
    embedding's ``embed_scale`` where it has one (a scaled embedding such as Gemma's).

    As in HF PEFT, A starts at zero and B Gaussian (the product is zero either way) and no dropout
    is applied to token indices.
    """

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B")
    mixes_rows: ClassVar[bool] = True
    base_layer: nn.Embedding

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        #: adapter name → A (r × vocab) and B (dim × r)
        self.lora_embedding_A: nn.ParameterDict = nn.ParameterDict()
        self.lora_embedding_B: nn.ParameterDict = nn.ParameterDict()

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r × vocab) and B (dim × r)."""
        return cast(torch.Tensor, self.lora_embedding_A[name]), cast(torch.Tensor, self.lora_embedding_B[name])

    def add(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
            init_A: str = "kaiming", init_B: str = "zero", dropout_position: str = "pre",
            lora_bias: bool = False) -> None:
        if lora_bias:  # the config refuses it before the model is touched; a guard for direct callers
            raise ConfigError("lora_bias=True is not supported on nn.Embedding (nor by HF PEFT); use lora_bias=False")
        weight = self.base_layer.weight
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        num, dim = weight.shape
        A = torch.empty(rank, num, **factory)
        B = torch.empty(dim, rank, **factory)
        if (init_A, init_B) == ("kaiming", "zero"):
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            init_factor(A, init_A, rank)
            init_factor(B, init_B, rank)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)
        self._add_common(name, rank, alpha, 0.0, use_rslora, dropout_position)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return (B @ A).T * self.scaling[name]

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
        return None

    def embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)

    def row_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors(name)
        return self.scaled((self.embed(x, A.T) @ B.T) * self.scaling[name])

    def scaled(self, update: torch.Tensor) -> torch.Tensor:
        """``update`` times the factor a scaled embedding multiplies its lookups by (``embed_scale``: Gemma's √dim),
        as the base lookup takes it: so the output equals a lookup in the merged table, as in HF PEFT."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            return update * scale.to(update.dtype)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return update * scale
        return update


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a convolution with the base's kernel (in → r), B a 1×1 one (r → out, with
    a bias under ``lora_bias``)."""

    adapter_containers: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    takes_lora_bias: ClassVar[bool] = True
    mixes_rows: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ConfigError(
                f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported; "
                "exclude this layer with exclude_modules"
            )
        #: adapter name → A (a convolution in → r with the base's kernel) and B (a 1×1 convolution r → out)
        self.lora_A: nn.ModuleDict = nn.ModuleDict()
        self.lora_B: nn.ModuleDict = nn.ModuleDict()

    def factor_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r, in, *kernel) and B (out, r, 1, ...) convolution weights."""
        return cast(torch.Tensor, self.lora_A[name].weight), cast(torch.Tensor, self.lora_B[name].weight)

    def add(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
            init_A: str = "kaiming", init_B: str = "zero", dropout_position: str = "pre",
            lora_bias: bool = False) -> None:
        base = self.base_layer
        conv = type(base)
        weight = self._base_weight()
        factory: dict[str, Any] = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.lora_A[name] = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                 base.dilation, bias=False, padding_mode=base.padding_mode, **factory)
        self.lora_B[name] = conv(rank, base.out_channels, 1, 1, bias=lora_bias, **factory)
        A, B = self.factor_weights(name)
        init_factor(A, init_A, rank)
        init_factor(B, init_B, rank)
        self._zero_up_bias(name)
        self._add_common(name, rank, alpha, dropout, use_rslora, dropout_position)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factor_weights(name)  # A: (r, in, *kernel)
        B = B.flatten(1)  # (out, r): B is a 1×1 convolution
        return torch.einsum("or,ri...->oi...", B, A) * self.scaling[name]

    def _base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def _set_base_weight(self, weight: torch.Tensor) -> float | None:
        with torch.no_grad():
            self._base_weight().copy_(weight)
        return None


#: Base-layer type → LoRA layer class; linear-like kinds (``LINEAR_KINDS``) fall back to ``LoRALinear``.
LORA_LAYERS: TypeRegistry[type[LoRALayer]] = TypeRegistry()
LORA_LAYERS.register(nn.Embedding, LoRAEmbedding)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    LORA_LAYERS.register(_conv, LoRAConv)


def lora_layer_class(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class for a base module, or ``None`` if LoRA cannot wrap it."""
    found = LORA_LAYERS.lookup(type(module))
    if found is not None:
        return found
    return LoRALinear if linear_kind(module) is not None else None

