"""SHiRA: sparse high-rank adapters, trained values at a fixed sparse set of weight entries.

Paper: Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024 (https://arxiv.org/abs/2406.13175).

Each adapted layer with weight W₀ (out × in) trains k = r·(in + out) values w ∈ ℝᵏ (as many as a rank-r LoRA) placed
at k fixed entries E of the weight, chosen by a 0/1 mask M::

    x ↦ W₀x + ΔW x,        ΔW[E] = w, zero elsewhere,   E = {(i, j) : M[i, j] = 1}

ΔW is sparse but of high rank. The default mask (``mask_type="random"``) sets the entries at the first k positions
of ``torch.randperm(out·in)`` drawn from a ``torch.Generator`` seeded with ``random_seed`` (unseeded, its fixed
default seed, when ``None``), exactly as Hugging Face PEFT 0.21.2 (``SHIRA``) draws it; any other mask comes from a
Python callable, ``mask_fn``. E is kept in row-major order as a (2, k) int32 tensor and saved beside w, as HF PEFT
saves them (``…<layer>.shira_weight`` and ``…<layer>.shira_indices``), so an adapter loads with its own mask
whatever made it. w starts at zero (the unchanged model) or, with ``init_weights=False``, standard normal from
torch's global generator. ``nn.Linear`` and quantized linears, as in HF PEFT (GPT-2's ``Conv1D`` is refused there
too); merging adds ΔW to the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import LINEAR_KINDS, LinearKind, is_fan_in_fan_out, linear_kind, register_method
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.io.hf_names import hf_layer_config, hf_layer_fields
from peftkit.methods.additive import DeltaLayer
from peftkit.methods.default_targets import LORA_TARGETS, with_default_targets
from peftkit.methods.lora_layers import adapter_dtype
from peftkit.methods.vera import SharedProjection

#: model_type → SHiRA's default target_modules: LoRA's, except Phi (HF PEFT's SHiRA mapping).
SHIRA_TARGETS: dict[str, tuple[str, ...]] = {**LORA_TARGETS, "phi": ("q_proj", "v_proj")}

#: ``mask_fn(base_layer, r)`` → an (out × in) tensor of 0s and 1s with exactly r·(in + out) ones.
MaskFn = Callable[[nn.Module, int], torch.Tensor]


def random_mask(out_features: int, in_features: int, rank: int, seed: int | None) -> torch.Tensor:
    """HF PEFT's random (out × in) boolean mask: r·(in + out) entries from ``randperm`` of a generator seeded with
    ``seed`` (a fresh generator's default seed when ``None``, so the mask is the same every time)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    picked = torch.randperm(out_features * in_features, generator=generator)[: rank * (in_features + out_features)]
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[picked] = True
    return mask.view(out_features, in_features)


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """The (2, k) int32 rows and columns of ``mask``'s ones, in row-major order."""
    return torch.nonzero(mask == 1).T.to(torch.int32).contiguous()


def _supported(module: nn.Module) -> bool:
    """Linear-like with a (out, in) weight: ``nn.Linear`` and quantized linears, not GPT-2's ``Conv1D``."""
    return linear_kind(module) is not None and not is_fan_in_fan_out(module)


def _sizes(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported module or of the one a SHiRA layer wraps."""
    base = module.base_layer if isinstance(module, SHiRALayer) else module
    kind = cast(LinearKind, linear_kind(base))
    return kind.in_features(base), kind.out_features(base)


class SHiRALayer(DeltaLayer):
    """SHiRA on a linear layer: ``base(x) + x ΔWᵀ`` with ΔW zero outside the adapter's indices.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not ``nn.Linear`` or a quantized linear.
    """

    adapter_containers = ("shira_weight",)

    def __init__(self, base_layer: nn.Module) -> None:
        if not _supported(base_layer):
            raise UnsupportedLayerError(f"SHiRA cannot adapt a {type(base_layer).__name__}; it adapts nn.Linear and "
                                        "quantized linear layers, as HF PEFT does")
        super().__init__(base_layer)
        self.in_features, self.out_features = _sizes(base_layer)
        self.shira_weight = nn.ParameterDict()
        # Buffers that move with the layer, out of the model's state dict (as in HF PEFT) but saved with the adapter.
        self.shira_indices = SharedProjection(persistent=False)  # one per layer here: VeRA's per-adapter buffers

    def add(self, name: str, mask: torch.Tensor, init_weights: bool, where: str) -> None:
        """Add adapter ``name`` training the entries where ``mask`` is 1.

        Raises:
            ConfigError: ``mask`` is not (out × in) or holds other than 0s and 1s (``where`` names the layer).
        """
        shape = (self.out_features, self.in_features)
        if tuple(mask.shape) != shape or not bool(((mask == 0) | (mask == 1)).all()):
            seen = sorted(set(mask.flatten().tolist()))[:4]
            raise ConfigError(f"the SHiRA mask for {where} must be a {shape[0]} × {shape[1]} tensor of 0s and 1s; "
                              f"got shape {tuple(mask.shape)} with values {seen} (check mask_fn)")
        indices = mask_indices(mask.detach().cpu())
        values = torch.zeros(indices.shape[1]) if init_weights else torch.randn(indices.shape[1])
        weight = self.kind.weight(self.base_layer)
        if weight.dtype.is_floating_point:  # HF PEFT rounds them to the base dtype, then keeps fp32 over half
            values = values.to(weight.dtype)
        self.shira_weight[name] = nn.Parameter(values.to(weight.device, adapter_dtype(weight)))
        self.shira_indices.add(name, indices.to(weight.device))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.shira_indices.remove(name)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The trained values and, under HF PEFT's key, their indices (loading copies a file's indices in)."""
        tensors = super().adapter_tensors(name)
        if name in self.shira_indices:
            tensors["shira_indices"] = self.shira_indices[name]
        return tensors

    def _delta(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name``, (out, in), in the values' dtype (differentiable)."""
        values = self.shira_weight[name]
        rows, cols = self.shira_indices[name].long()
        delta = torch.zeros(self.out_features, self.in_features, dtype=values.dtype, device=values.device)
        return delta.index_put((rows, cols), values)


@register_method
@dataclass
class SHiRA(AdapterConfig):
    """SHiRA: r·(in + out) trained weight entries per layer at a fixed sparse mask.

    Attributes:
        rank: r (HF PEFT: ``r``); each layer trains r·(in + out) entries, as many parameters as a rank-r LoRA
            (ΔW is not limited to rank r). r·(in + out) may not exceed a layer's out·in entries.
        mask_type: ``"random"``: HF PEFT's random mask from ``random_seed``. Another name is written to
            ``adapter_config.json`` as it is and needs ``mask_fn``.
        random_seed: seed of the random mask (the same mask for layers of one shape); ``None`` uses a fresh
            ``torch.Generator``'s fixed default seed, as HF PEFT does, so the mask is not random across runs either.
        mask_fn: a Python callable ``mask_fn(base_layer, r)`` returning the (out × in) mask of 0s and 1s with
            exactly r·(in + out) ones (HF PEFT's ``config.mask_fn``). It is not saved: the indices it chose are, so a
            saved adapter loads without it (in HF PEFT too). Used whatever ``mask_type`` says.
        fan_in_fan_out: HF PEFT's field, written to ``adapter_config.json``; SHiRA adapts only layers storing their
            weight as (out, in), so it is always ``False`` there.
        init_weights: start from zero values (the unchanged model, HF PEFT's default); ``False`` draws them from
            N(0, 1).

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a target with fewer than
            r·(in + out) weight entries, or a mask from ``mask_fn`` of the wrong shape, values or count.
        UnsupportedLayerError: in ``pk.apply``, a target that is not ``nn.Linear`` or a quantized linear.
    """

    peft_type = "SHIRA"

    rank: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    mask_fn: MaskFn | None = field(default=None, repr=False, compare=False)
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank={self.rank!r} must be a positive integer (e.g. 32)")
        if not isinstance(self.mask_type, str) or not self.mask_type:
            raise ConfigError(f"mask_type={self.mask_type!r} must be 'random' or the name of your mask_fn's mask")
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise ConfigError(f"mask_fn={self.mask_fn!r} must be a callable mask_fn(base_layer, r) -> mask")
        if self.mask_type != "random" and self.mask_fn is None:
            raise ConfigError(f"mask_type={self.mask_type!r} needs mask_fn=<a callable mask_fn(base_layer, r) -> "
                              "mask>; the built-in mask is mask_type='random'")
        seed = self.random_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"random_seed={seed!r} must be an integer seed (e.g. 42) or None")
        for name in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` omitted: those HF PEFT's SHiRA adapts on this architecture."""
        return with_default_targets(self, model, SHIRA_TARGETS)

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second SHiRA adapter only
            return isinstance(module, SHiRALayer)
        return _supported(module)

    def supported_layer_names(self) -> list[str]:
        return [n for n in LINEAR_KINDS.names() if n != "Conv1D"]

    def resolve(self, model: nn.Module) -> list[str]:
        """The targets, each checked to hold at least r·(in + out) weight entries before the model changes."""
        targets = super().resolve(model)
        for target in targets:
            in_features, out_features = _sizes(model.get_submodule(target))
            count = self.rank * (in_features + out_features)
            if count > in_features * out_features:
                most = in_features * out_features // (in_features + out_features)
                fix = f"use rank <= {most}" if most else "leave it out (exclude_modules)"
                raise ConfigError(f"rank={self.rank} trains r·(in + out) = {count} entries at {target}, more than its "
                                  f"{out_features} × {in_features} = {in_features * out_features} weight entries; "
                                  f"{fix}")
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, SHiRALayer) else SHiRALayer(module)
        layer.add(adapter_name, self._mask(layer, qualname), self.init_weights, qualname)
        return layer

    def _mask(self, layer: SHiRALayer, qualname: str) -> torch.Tensor:
        """The mask of ``layer`` (at ``qualname``): ``mask_fn``'s, checked to hold r·(in + out) ones, or random."""
        count = self.rank * (layer.in_features + layer.out_features)
        if self.mask_fn is None:
            return random_mask(layer.out_features, layer.in_features, self.rank, self.random_seed)
        mask = self.mask_fn(layer.base_layer, self.rank)
        if not isinstance(mask, torch.Tensor):
            raise ConfigError(f"mask_fn returned a {type(mask).__name__} for {qualname}; it must return a tensor")
        ones = int((mask == 1).sum())
        if ones != count:
            raise ConfigError(f"mask_fn's mask for {qualname} has {ones} ones; SHiRA needs r·(in + out) = {count} "
                              f"(rank={self.rank}) in its {layer.out_features} × {layer.in_features} mask")
        return mask

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return hf_layer_config(
            self, targets, module_names, lacks=("exclude_modules", "layers_to_transform", "layers_pattern"),
            r=self.rank,
            mask_type=self.mask_type,
            random_seed=self.random_seed,
            fan_in_fan_out=self.fan_in_fan_out,  # set by save_adapter from the targets' layer types
            init_weights=self.init_weights,
            auto_mapping=None,
        )

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> SHiRA:
        mask_type = data.get("mask_type", "random") or "random"
        return cls(
            **hf_layer_fields(data, module_names),
            rank=int(data.get("r", 32)),
            mask_type=mask_type,
            random_seed=data.get("random_seed"),
            # A custom mask's indices are in the file: any mask of the right size stands in until they are loaded.
            mask_fn=None if mask_type == "random" else _placeholder_mask,
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            init_weights=bool(data.get("init_weights", True)),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


def _placeholder_mask(base_layer: nn.Module, rank: int) -> torch.Tensor:
    """A mask of the right size for a config read from a file whose mask came from a ``mask_fn``: the file's indices
    replace it when the adapter loads (applied elsewhere without them, it is a seed-0 random mask)."""
    in_features, out_features = _sizes(base_layer)
    return random_mask(out_features, in_features, rank, 0)


_HF_FIELDS = frozenset(
    "peft_type task_type r mask_type random_seed target_modules fan_in_fan_out init_weights modules_to_save "
    "inference_mode base_model_name_or_path revision auto_mapping".split()
)
