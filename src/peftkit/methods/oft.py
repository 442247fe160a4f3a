"""OFT: orthogonal finetuning, a block-diagonal rotation of each adapted layer's input space.

Paper: Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023
(https://arxiv.org/abs/2306.07280); the Cayley–Neumann form from Qiu et al., "Orthogonal Finetuning Made Scalable",
2025 (https://arxiv.org/abs/2506.19847). Hugging Face PEFT 0.21.2's OFT is the reference for everything below.

A layer's rotated dimension d (a linear layer's inputs; a Conv2d's flattened filter, channels × k × k; an embedding's
vectors) is split into r blocks of size b = d / r. Each block i trains the b(b−1)/2 entries above the diagonal of a
skew-symmetric Qᵢ (stored packed, row by row: ``oft_R.weight`` of shape (r, b(b−1)/2)), turned into an orthogonal
Rᵢ by the Cayley transform, or by its Neumann series when ``use_cayley_neumann`` (HF PEFT's truncation, see
:func:`cayley`)::

    Rᵢ = (I − Qᵢ)(I + Qᵢ)⁻¹        R = diag(R₁, …, R_r)        x ↦ W₀ (x R)ᵀ     (linear: base(x R))

Q = 0 at first, so R = I and the output is the base's. A Conv2d's filter is rotated instead (W = W₀ Rᵀ over the
flattened filter), an embedding's output vectors are (e R). ``block_share`` trains one block used r times;
``coft`` (constrained OFT) projects each Qᵢ back into a ball of radius eps/√r before every use, in place, as HF
PEFT does. Several active adapters rotate in turn, in their order. Merging multiplies the weight by R (exactly what
the forward computes); unmerging solves with it, so a Neumann-series R, only nearly orthogonal, comes out exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import DEQUANTIZERS, TypeRegistry, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields, hf_unknown_options
from peftkit.methods.biases import AdaptedBiases
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.rotation import RotationLayer

logger = logging.getLogger("peftkit")

#: Base layers OFT adapts (HF PEFT's three) → what it rotates: the input (``"linear"``), the flattened filter
#: (``"conv2d"``) or the output vectors (``"embedding"``).
OFT_KINDS: TypeRegistry[str] = TypeRegistry()
OFT_KINDS.register(nn.Linear, "linear")
OFT_KINDS.register(nn.Conv2d, "conv2d")
OFT_KINDS.register(nn.Embedding, "embedding")
BIAS_MODES = ("none", "all", "oft_only")
#: The HF PEFT version whose parametrisation peftkit computes (its Cayley–Neumann series changed in 0.18.0).
HF_VERSION = "0.21.2"


def oft_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"`` or ``"embedding"`` for a layer OFT adapts, else ``None`` (a quantized linear
    layer too: merging would have to rewrite its packed weight)."""
    if DEQUANTIZERS.lookup(type(module)) is not None:
        return None
    return OFT_KINDS.lookup(type(module))


def rotated_features(module: nn.Module) -> int:
    """The dimension OFT rotates: a linear layer's inputs, a Conv2d's channels × k × k, an embedding's size."""
    weight = cast(torch.Tensor, module.weight)
    return int(weight.shape[1]) * math.prod(int(k) for k in weight.shape[2:])


def check_layer(module: nn.Module, where: str) -> None:
    """Refuse a Conv2d HF PEFT's OFT cannot compute (its merge reshapes the weight as (out, in·k₀·k₀)).

    Raises:
        UnsupportedLayerError: a grouped, dilated or non-square Conv2d, naming the layer.
    """
    if not isinstance(module, nn.Conv2d):
        return
    problems = [text for bad, text in ((module.groups != 1, f"groups={module.groups}"),
                                       (any(d != 1 for d in module.dilation), f"dilation={module.dilation}"),
                                       (module.kernel_size[0] != module.kernel_size[1],
                                        f"kernel_size={module.kernel_size}")) if bad]
    if problems:
        raise UnsupportedLayerError(
            f"OFT cannot adapt {where} ({', '.join(problems)}): as in HF PEFT, only Conv2d layers with square kernels, "
            "no dilation and groups=1 can be rotated; leave it out of target_modules"
        )


def nearest_divisor(dimension: int, value: int) -> int:
    """HF PEFT's replacement for an ``r`` or ``oft_block_size`` that does not divide ``dimension``: the nearest
    divisor (the smaller one on a tie), or ``dimension`` itself for a value at least that large."""
    if value >= dimension:
        return dimension
    higher = value
    while higher <= dimension and dimension % higher:
        higher += 1
    lower = value
    while lower > 1 and dimension % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def block_layout(dimension: int, r: int, block_size: int, adjust: bool, where: str) -> tuple[int, int]:
    """``(blocks, block_size)`` for a layer rotating ``dimension`` features, from ``r`` or ``oft_block_size``
    (exactly one is non-zero). With ``adjust`` a value that does not divide ``dimension`` is replaced by the nearest
    divisor, with a warning, as HF PEFT does; otherwise it is refused.

    Raises:
        ConfigError: the value does not divide ``dimension`` and ``adjust`` is off (the option and divisors named).
    """
    option, value = ("r", r) if r else ("oft_block_size", block_size)
    if dimension % value or value > dimension:
        fixed = nearest_divisor(dimension, value)
        if not adjust:
            divisors = [d for d in range(1, dimension + 1) if dimension % d == 0]
            raise ConfigError(
                f"{option}={value} does not divide the {dimension} features {where} rotates (divisors: {divisors}); "
                f"HF PEFT would use {option}={fixed} there with a warning. Choose a divisor of every target's size, "
                "or pass adjust_block_size=True to adjust it as HF PEFT does"
            )
        logger.warning("OFT: %s=%d does not divide the %d features %s rotates; using %s=%d, as HF PEFT does",
                       option, value, dimension, where, option, fixed)
        value = fixed
    return (value, dimension // value) if option == "r" else (dimension // value, value)


def cayley(skew: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal matrices from skew-symmetric ones (a batch of b × b), as HF PEFT computes them.

    Exact: R = (I − Q)(I + Q)⁻¹ (HF PEFT's identity matrix is in the default dtype, so half-precision blocks are
    solved in fp32). Neumann: (I + Q)⁻¹ ≈ Σ (−Q)ᵏ gives R ≈ I + 2Q + 2Q² + … + 2Q^(n−1) + Qⁿ with n = max(3, terms − 1)
    (``terms`` 2: I + 2Q), HF PEFT's truncation, summed in its order.
    """
    count, size = skew.shape[0], skew.shape[-1]
    if not neumann:
        eye = torch.eye(size, device=skew.device).expand(count, size, size)
        return cast(torch.Tensor, torch.linalg.solve(eye + skew, eye - skew, left=False)).to(skew.dtype)
    rotation = torch.eye(size, device=skew.device, dtype=skew.dtype).repeat(count, 1, 1)
    if terms > 1:
        rotation = torch.add(rotation, skew, alpha=2.0)
    if terms > 2:
        top, power = max(3, terms - 1), skew
        for exponent in range(2, top + 1):
            power = torch.bmm(power, skew)
            rotation = torch.add(rotation, power, alpha=2.0 if exponent < top else 1.0)
    return rotation


class OFTRotation(nn.Module):
    """One adapter's rotation on one layer: ``weight`` holds the packed upper triangles of the skew-symmetric blocks
    (r × b(b−1)/2; 1 × b(b−1)/2 with ``block_share``), HF PEFT's ``oft_R.<adapter>.weight``."""

    #: Row and column of each packed entry in its block (not saved).
    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, blocks: int, block_size: int, *, share: bool, coft: bool, eps: float, neumann: bool,
                 terms: int, **factory: Any) -> None:
        super().__init__()
        self.blocks, self.block_size, self.share = blocks, block_size, share
        self.coft, self.eps, self.neumann, self.terms = coft, eps, neumann, terms
        self.weight = nn.Parameter(torch.zeros(1 if share else blocks, block_size * (block_size - 1) // 2, **factory))
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=factory.get("device"))
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, packed: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric blocks Q (count × b × b) of packed upper triangles."""
        upper = packed.new_zeros(packed.shape[0], self.block_size, self.block_size)
        upper[:, self.rows, self.cols] = packed
        return upper - upper.transpose(-2, -1)

    @torch.no_grad()
    def project(self) -> None:
        """Constrained OFT: scale every block whose ‖Q‖_F exceeds eps/√(stored blocks) back onto that radius, in
        place (HF PEFT's ``_project_batch``, before every use of the weight)."""
        skew = self.skew(self.weight)
        radius = self.eps / torch.sqrt(torch.tensor(self.weight.shape[0]))
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        projected = torch.where(norm <= radius, skew, radius * (skew / norm))
        self.weight.copy_(projected[:, self.rows, self.cols])

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks R (blocks × b × b); with ``block_share`` one block, repeated."""
        if self.coft:
            self.project()
        rotation = cayley(self.skew(self.weight), self.neumann, self.terms)
        return rotation.expand(self.blocks, -1, -1) if self.share else rotation

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` over the last dimension, in the adapter's dtype."""
        x = x.to(self.weight.dtype)
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, self.rotations()).reshape(x.shape)


class OFTLayer(RotationLayer):
    """OFT adapters on an ``nn.Linear`` (``base(x R)``), ``nn.Conv2d`` (the filter rotated) or ``nn.Embedding``
    (``embed(ids) R``).

    Raises:
        UnsupportedLayerError: ``base_layer`` is of another type, or a Conv2d HF PEFT cannot rotate.
    """

    method = "OFT"
    adapter_containers: ClassVar[tuple[str, ...]] = ("oft_R", "oft_embedding_R")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        kind = oft_kind(base_layer)
        if kind is None:
            raise UnsupportedLayerError(f"OFT cannot adapt a {type(base_layer).__name__}; supported layer types: "
                                        f"{', '.join(OFT_KINDS.names())}")
        check_layer(base_layer, type(base_layer).__name__)
        self.kind = kind
        self.features = rotated_features(base_layer)
        self.oft_R = nn.ModuleDict()
        #: An embedding's rotations (HF PEFT keeps them apart, under their own key).
        self.oft_embedding_R = nn.ModuleDict()

    @property
    def rotations(self) -> nn.ModuleDict:
        return self.oft_embedding_R if self.kind == "embedding" else self.oft_R

    def add(self, name: str, blocks: int, block_size: int, *, share: bool = False, coft: bool = False,
            eps: float = 6e-5, neumann: bool = True, terms: int = 5, init_weights: bool = True) -> None:
        weight = cast(torch.Tensor, self.base_layer.weight)
        rotation = OFTRotation(blocks, block_size, share=share, coft=coft, eps=eps, neumann=neumann, terms=terms,
                               device=weight.device, dtype=adapter_dtype(weight))
        if not init_weights:  # HF PEFT's random start (for tests): R ≠ I
            with torch.no_grad():
                nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        self.rotations[name] = rotation

    def _rotation(self, name: str) -> OFTRotation:
        return cast(OFTRotation, self.rotations[name])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self._applied()
        if not names:
            return cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
        if self.kind == "linear":
            h = x
            for name in names:
                h = self._rotation(name).rotate(h)
            return cast(torch.Tensor, self.base_layer(h.to(x.dtype), *args, **kwargs))
        if self.kind == "embedding":
            result = cast(torch.Tensor, self.base_layer(x, *args, **kwargs))
            out = result
            for name in names:
                out = self._rotation(name).rotate(out)
            return out.to(result.dtype)
        # A Conv2d: the filter rotated as merging rotates it (HF PEFT 0.21.2 rotates unfolded input patches instead
        # and folds them back summed, which differs from its own merge for kernels larger than 1: see the README).
        conv = cast(nn.Conv2d, self.base_layer)
        weight = conv.weight.to(adapter_dtype(conv.weight))
        for name in names[::-1]:  # x R₁ R₂ … through W₀: W₀ (R₁ R₂ …)ᵀ, the last rotation applied first
            weight = self._rotated(weight, name, inverse=False)
        return cast(torch.Tensor, conv._conv_forward(x, weight.to(conv.weight.dtype), conv.bias))

    # -- merging: W ← W Rᵀ (inputs or filter) or W R (embedding vectors) -----------------------------------
    @property
    def merges_prefix(self) -> bool:
        # x R₁ R₂ … through W₀ is W₀ (R₁ R₂ …)ᵀ: the weight holds the last rotations; an embedding's e R₁ R₂, the first
        return self.kind == "embedding"

    def _rotated(self, weight: torch.Tensor, name: str, inverse: bool) -> torch.Tensor:
        """``weight`` with adapter ``name``'s rotation folded in (``inverse``: taken out again, by solving)."""
        rotation = self._rotation(name)
        blocks = rotation.rotations().to(weight.dtype)
        factor = blocks if self.kind == "embedding" else blocks.transpose(-2, -1)
        grouped = weight.reshape(weight.shape[0], rotation.blocks, rotation.block_size).transpose(0, 1)
        if inverse:
            grouped = torch.linalg.solve(factor, grouped, left=False)
        else:
            grouped = torch.bmm(grouped, factor)
        return grouped.transpose(0, 1).reshape(weight.shape)


def _integer(field_name: str, value: Any, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field_name}={value!r} must be an integer >= {minimum}{hint}")


def _flag(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} must be True or False")


#: ``adapter_config.json`` fields of every PEFT config that do not change what an adapter computes.
_HF_FIELDS = frozenset(
    "r oft_block_size module_dropout target_modules fan_in_fan_out bias exclude_modules init_weights "
    "layers_to_transform layers_pattern modules_to_save coft eps block_share use_cayley_neumann "
    "num_cayley_neumann_terms".split())


@register_method
@dataclass
class OFT(AdaptedBiases, AdapterConfig):
    """OFT: ``base(x R)`` with R block-diagonal and orthogonal (HF PEFT's ``OFTConfig``, its field names and
    defaults), on ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``.

    Attributes:
        r: the number of blocks per layer; 0 to give ``oft_block_size`` instead (exactly one of the two is non-zero).
        oft_block_size: the size b of each block (HF PEFT's default 32); 0 to give ``r`` instead.
        module_dropout: must stay 0.0: HF PEFT 0.21.2 builds its multiplicative dropout but never applies it, so
            peftkit refuses a value rather than ignore it (a value in an HF PEFT file is kept, and means nothing).
        coft: constrained OFT: keep each skew-symmetric block within ‖Q‖_F ≤ eps/√(blocks) (projected in place).
        eps: the radius of ``coft`` (no effect without it).
        block_share: one block of parameters for all r blocks of a layer.
        use_cayley_neumann: R from a truncated Neumann series (no matrix inverse) instead of the exact Cayley
            transform.
        num_cayley_neumann_terms: the series' terms (see :func:`cayley`), at least 2.
        init_weights: ``True``: Q = 0, so R = I and the model starts as the base; ``False``: Q ~ N(0, 0.1²).
        bias: ``"none"``, ``"all"`` (every bias of the model trains and is saved) or ``"oft_only"`` (the adapted
            layers' biases).
        adjust_block_size: where ``r`` or ``oft_block_size`` does not divide a target's rotated size, use the nearest
            divisor with a warning, as HF PEFT does (on for adapters loaded from a file); otherwise that is an error.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a block size that does not divide
            a target's size (unless ``adjust_block_size``).
        UnsupportedLayerError: in ``pk.apply``, a target of another type, or a grouped, dilated or non-square Conv2d.
    """

    peft_type = "OFT"
    bias_layer = OFTLayer
    bias_only = "oft_only"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True
    bias: str = "none"
    adjust_block_size: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _integer("r", self.r, 0)
        _integer("oft_block_size", self.oft_block_size, 0)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"give exactly one of r (blocks per layer) and oft_block_size (their size), the other 0; got "
                f"r={self.r}, oft_block_size={self.oft_block_size} (e.g. pk.OFT(oft_block_size=32) or "
                "pk.OFT(r=8, oft_block_size=0))"
            )
        if self.module_dropout != 0:
            raise ConfigError(
                f"module_dropout={self.module_dropout!r}: HF PEFT 0.21.2 builds OFT's multiplicative dropout but never "
                "applies it (an adapter trained there with it trained without), so peftkit does not offer it; use 0.0"
            )
        for name in ("coft", "block_share", "use_cayley_neumann", "init_weights", "adjust_block_size"):
            _flag(name, getattr(self, name))
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps <= 0:
            raise ConfigError(f"eps={self.eps!r} must be a positive number (e.g. 6e-5)")
        _integer("num_cayley_neumann_terms", self.num_cayley_neumann_terms, 2,
                 " (fewer make every rotation the identity)")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")

    # -- wrapping --------------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: LoRA's defaults for the architecture, as HF PEFT takes them."""
        return with_default_targets(self, model, LORA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second adapter of the same method only
            return type(module) is OFTLayer
        return oft_kind(module) is not None

    def supported_layer_names(self) -> list[str]:
        return OFT_KINDS.names()

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to be a layer OFT can rotate with these block sizes before anything changes."""
        targets = super().resolve(model)
        for target in targets:
            module = model.get_submodule(target)
            base = module.base_layer if isinstance(module, OFTLayer) else module
            check_layer(base, target)
            if not self.adjust_block_size:
                block_layout(rotated_features(base), self.r, self.oft_block_size, False, target)
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, OFTLayer) else OFTLayer(module)
        blocks, size = block_layout(layer.features, self.r, self.oft_block_size, self.adjust_block_size, qualname)
        layer.add(adapter_name, blocks, size, share=self.block_share, coft=self.coft, eps=self.eps,
                  neumann=self.use_cayley_neumann, terms=self.num_cayley_neumann_terms, init_weights=self.init_weights)
        return layer

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names,
            r=self.r,
            oft_block_size=self.oft_block_size,
            module_dropout=self.module_dropout,
            fan_in_fan_out=False,
            bias=self.bias,
            init_weights=self.init_weights,
            coft=self.coft,
            eps=self.eps,
            block_share=self.block_share,
            use_cayley_neumann=self.use_cayley_neumann,
            num_cayley_neumann_terms=self.num_cayley_neumann_terms,
            # HF PEFT warns that a Cayley–Neumann adapter without it predates 0.18's series; this is 0.21.2's.
            peft_version=HF_VERSION,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> OFT:
        hf_unknown_options(data, _HF_FIELDS, "OFT", advice="load it with HF PEFT")
        if "oft_block_size" not in data:
            raise ConfigError("adapter_config.json has no oft_block_size: an OFT adapter from HF PEFT before 0.14, "
                              "whose format neither HF PEFT 0.21 nor peftkit reads; train it again")
        neumann = bool(data.get("use_cayley_neumann", True))
        version = str(data.get("peft_version") or "0.0.0").partition("@")[0]
        if neumann and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 18):
            logger.warning("OFT adapter from HF PEFT %s, before 0.18 changed the Cayley-Neumann series; it is loaded "
                           "with the new one (HF PEFT warns the same), so it computes something else than it was "
                           "trained with", data.get("peft_version") or "< 0.18")
        kept = ("auto_mapping", "peft_version", *(("module_dropout",) if data.get("module_dropout") else ()))
        return cls(
            **hf_layer_fields(data, module_names),  # layers_to_transform resolved as HF PEFT does
            r=data.get("r", 0) or 0,
            oft_block_size=data["oft_block_size"] or 0,
            coft=bool(data.get("coft", False)),
            eps=data.get("eps", 6e-5),
            block_share=bool(data.get("block_share", False)),
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=data.get("num_cayley_neumann_terms", 5),
            init_weights=bool(data.get("init_weights", True)),
            bias=data.get("bias", "none") or "none",
            adjust_block_size=True,  # the block sizes HF PEFT used
            extra={k: data[k] for k in kept if k in data},  # module_dropout: inert in HF PEFT, written back as read
        )
