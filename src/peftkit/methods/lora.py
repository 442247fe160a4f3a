"""LoRA: the config, its validation, and its Hugging Face PEFT ``adapter_config.json`` form.

Formula and layers: see :mod:`peftkit.methods.lora_layers`. Paper: Hu et al., "LoRA: Low-Rank Adaptation
of Large Language Models", ICLR 2022 (https://arxiv.org/abs/2106.09685); rsLoRA: Kalajdzievski, 2023
(https://arxiv.org/abs/2312.03732).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, cast

from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import first_match, matches, near_misses
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.registry import LINEAR_KINDS, register_method
from peftkit.errors import ConfigError
from peftkit.io.hf_names import hf_layer_targets, hf_modules_to_save, hf_parameters, hf_pattern, hf_resolve, hf_targets
from peftkit.methods import lora_activated as activated
from peftkit.methods import lora_params
from peftkit.methods import lora_replication as replication
from peftkit.methods.default_targets import LORA_TARGETS, default_for
from peftkit.methods.lora_init import (
    DATA_INITS,
    check_init,
    check_targets,
    init_from_hf,
    initialize,
    loftq_config,
    loftq_from_hf,
)
from peftkit.methods.lora_layers import LORA_LAYERS, LoRALayer, LoRALinear, lora_layer_class

logger = logging.getLogger("peftkit")

INIT_METHODS = ("kaiming", "xavier", "gaussian", "zero")
BIAS_MODES = ("none", "all", "lora_only")


def _positive_int(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field_name}={value!r} must be a positive integer (e.g. 8)")


def _positive_number(field_name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field_name}={value!r} must be a positive number (e.g. 16)")


class _AddsAdapter(Protocol):
    """What LoRA's layer classes define. ``LoRALayer`` cannot declare it: AdaLoRA's ``SVDLinear`` subclasses it
    with another ``add`` signature."""

    def add(self, name: str, rank: int, alpha: float, *, dropout: float = ..., use_rslora: bool = ...,
            init_A: str = ..., init_B: str = ..., dropout_position: str = ..., lora_bias: bool = ...) -> None: ...


@register_method
@dataclass
class LoRA(AdapterConfig):
    """Low-rank adaptation: ``W₀x + s·B A dropout(x)`` with ``s = alpha/rank`` (``alpha/√rank`` with rsLoRA).

    Attributes:
        rank: the rank r of the update (HF PEFT: ``r``).
        alpha: the scale numerator α (HF PEFT: ``lora_alpha``).
        dropout: dropout probability on the adapter's input, in [0, 1).
        dropout_position: ``"pre"`` (on the input, as HF PEFT) or ``"post"`` (on the adapter output, Megatron).
        use_rslora: scale by α/√r instead of α/r.
        init_A, init_B: ``"kaiming"``, ``"xavier"``, ``"gaussian"`` or ``"zero"``; B = 0 keeps the output unchanged.
        init: both factors from the base weight instead (HF PEFT's string ``init_lora_weights``, linear-like layers):
            ``"pissa"``, ``"pissa_niter_<N>"`` (randomized SVD), ``"olora"`` or ``"orthogonal"``. PiSSA and OLoRA
            replace the base weight by the residual ``W − s·BA``; ``"loftq"`` by its quantized form Q, with
            ``s·BA ≈ W − Q`` (quantize the model afterwards); see :mod:`peftkit.methods.lora_init`. ``"eva"`` and
            ``"corda"``: a plain LoRA adapter until ``pk.init_eva(model, batches)`` or ``pk.init_corda(model,
            run_model)`` computes it from data (:mod:`peftkit.methods.lora_eva`, :mod:`peftkit.methods.lora_corda`).
        loftq_bits, loftq_iter: LoftQ's quantization (4: NF4, 8: int8) and alternating steps (HF PEFT's
            ``loftq_config``); only with ``init="loftq"``.
        rank_pattern, alpha_pattern: per-module overrides, pattern → value (first matching pattern wins).
        bias: ``"none"``, ``"all"`` (every bias trains and is saved) or ``"lora_only"`` (biases of adapted layers).
        lora_bias: give B a trained bias b, starting at zero (HF PEFT's ``lora_bias``): the update becomes
            ``s·(B A dropout(x) + b)``. Linear-like layers and convolutions only; merging adds ``s·b`` to the base
            layer's bias, so it needs one.
        shared_A: groups of separate projections (exact qualified names) whose adapters share one A (performant
            LoRA, see :mod:`peftkit.methods.grouped`). The role names ``linear_qkv``/``linear_fc1`` add their
            groups on models with separate projections; the applied config records every group.
        trainable_token_indices: token ids whose input-embedding rows train too (a list), or module → ids; adds a
            trainable-tokens adapter of the same name (see :mod:`peftkit.methods.lora_tokens`).
        target_parameters: parameters to adapt directly, by key or dotted suffix (``"experts.gate_up_proj"``):
            the 3-D expert stacks of mixture-of-experts layers, one rank-r LoRA per expert (HF PEFT's
            ``target_parameters``, see :mod:`peftkit.methods.lora_params`). ``target_modules`` may then be empty.
            No dropout or ``lora_bias`` there; every adapter on a model that uses it must name the same parameters;
            ``exclude_modules`` and ``layers`` do not apply to them (as in HF PEFT: select with globs instead).
        layer_replication: half-open ranges ``[[start, end], …]`` of the original transformer blocks that make up the
            model's new stack before the adapter is added (HF PEFT's option; ``[[0, 4], [2, 5]]`` gives blocks
            0 1 2 3 2 3 4). Repeats share base weights, each position has its own adapter; merged only by
            ``pk.unload``, which first gives every position its own weights (see
            :mod:`peftkit.methods.lora_replication`).
        alora_invocation_tokens: token ids of an invocation sequence: the adapter then acts only from its last
            occurrence in each sample on, and nowhere in a sample without it (activated LoRA, HF PEFT's field; linear
            layers only, never merged, see :mod:`peftkit.methods.lora_activated`).
    """

    #: Whether the method can adapt parameters (``target_parameters``); its variants cannot, as in HF PEFT.
    takes_parameters: ClassVar[bool] = True

    #: Whether role-name groups on separate projections share one A (performant LoRA).
    shares_A: ClassVar[bool] = True
    #: Whether ``init`` (PiSSA, OLoRA, orthogonal) may be set.
    takes_weight_init: ClassVar[bool] = True
    #: Whether ``init`` may name a data-driven initialisation (EVA, CorDA).
    takes_data_init: ClassVar[bool] = True
    #: Whether ``alora_invocation_tokens`` (activated LoRA) may be set.
    takes_invocation_tokens: ClassVar[bool] = True

    peft_type = "LORA"
    #: The ``bias`` value for the adapted layers' biases (``peftkit compare`` passes each method its spelling).
    bias_only: ClassVar[str] = "lora_only"

    rank: int = 8
    alpha: float = 8
    dropout: float = 0.0
    dropout_position: str = "pre"
    use_rslora: bool = False
    init_A: str = "kaiming"
    init_B: str = "zero"
    init: str | None = None
    loftq_bits: int = 4
    loftq_iter: int = 1
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    shared_A: list[list[str]] = field(default_factory=list)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] = field(default_factory=list)
    layer_replication: list[list[int]] | None = None
    alora_invocation_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from peftkit.methods.lora_tokens import checked_token_spec

        self.trainable_token_indices = checked_token_spec(self.trainable_token_indices)
        self.layer_replication = replication.checked_layer_map(self.layer_replication)
        self.alora_invocation_tokens = activated.checked_tokens(self.alora_invocation_tokens)
        _positive_int("rank", self.rank)
        _positive_number("alpha", self.alpha)
        for key, value in self.rank_pattern.items():
            _positive_int(f"rank_pattern[{key!r}]", value)
        for key, alpha in self.alpha_pattern.items():
            _positive_number(f"alpha_pattern[{key!r}]", alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1) (e.g. 0.05)")
        for name in ("init_A", "init_B"):
            if getattr(self, name) not in INIT_METHODS:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be one of {INIT_METHODS}")
        check_init(self)
        if self.dropout_position not in ("pre", "post"):
            raise ConfigError(f"dropout_position={self.dropout_position!r} must be 'pre' or 'post'")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias={self.lora_bias!r} must be True or False")
        lora_params.check_config(self)
        activated.check_config(self)

    # -- per-module values -----------------------------------------------------------------------
    def rank_for(self, qualname: str) -> int:
        key = first_match(qualname, self.rank_pattern)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_for(self, qualname: str) -> float:
        key = first_match(qualname, self.alpha_pattern)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, qualname: str) -> float:
        from peftkit.methods.lora_layers import lora_scale

        return lora_scale(self.rank_for(qualname), self.alpha_for(qualname), self.use_rslora)

    # -- wrapping --------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> Callable[[], None] | None:
        return replication.replicate(model, self.layer_replication)

    @classmethod
    def planned_module_names(cls, data: dict[str, Any], model: nn.Module, names: list[str]) -> list[str]:
        return replication.planned_names(model, data.get("layer_replication"), names)

    def check_merge(self, model: nn.Module, name: str) -> None:
        activated.check_merge(self, name)

    def resolve(self, model: nn.Module) -> list[str]:
        from peftkit.methods.grouped import plan_groups

        targets = super().resolve(model) if self.target_modules or not self.target_parameters else []
        if self.target_parameters:
            lora_params.selected(self, model, targets)
        plan_groups(self, model, targets)  # validates role names and groups before the model is touched
        from peftkit.methods.lora_tokens import lora_token_targets

        lora_token_targets(model, self, targets)  # likewise the embeddings of trainable_token_indices
        if self.lora_bias:
            self._check_lora_bias(model, targets)
        self._check_patterns(model, targets)
        check_targets(self, model, targets)
        activated.check_targets(self, model, targets)
        return targets

    def inject_parameters(self, model: nn.Module, name: str) -> list[str]:
        """Add adapter ``name`` on the parameters ``target_parameters`` selects; their keys."""
        from peftkit.core.state import get_state

        keys = lora_params.selected(self, model, get_state(model).targets.get(name, []))
        lora_params.inject_parameters(model, keys, name, lambda key: (self.rank_for(key), self.alpha_for(key)),
                                      use_rslora=self.use_rslora, init_A=self.init_A, init_B=self.init_B)
        return keys

    def _check_patterns(self, model: nn.Module, targets: list[str]) -> None:
        """Refuse a rank/alpha pattern key that matches no module (or targeted parameter) of ``model`` (a typo
        would silently keep the default). One that matches modules which are not targets is allowed, as in HF
        PEFT; one that matches only the modules holding target parameters is named in a warning, since it changes
        nothing (a parameter's rank is looked up by its own key, as in HF PEFT)."""
        names: list[str] | None = None
        keys = lora_params.selected(self, model, []) if self.rank_pattern or self.alpha_pattern else []
        for field_name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in pattern:
                names = names or [n for n, _ in model.named_modules() if n] + keys
                if not any(matches(n, key) for n in names):
                    raise ConfigError(
                        f"{field_name} key {key!r} matches no module of {type(model).__name__}; closest module "
                        f"names: {near_misses(key, names)}. Keys use the target_modules syntax (e.g. 'v_proj' or "
                        "'*.layers.0.*.v_proj')"
                    )
                owners = [k for k in keys if matches(k.rpartition(".")[0], key)]
                if owners and not any(matches(n, key) for n in keys + targets):
                    logger.warning("%s key %r matches the modules holding the target parameters, not the parameters: "
                                   "it changes nothing. Name the parameters, e.g. %r", field_name, key,
                                   f"{key}.{owners[0].rpartition('.')[2]}")

    def _check_lora_bias(self, model: nn.Module, targets: list[str]) -> None:
        """Refuse ``lora_bias`` on a target whose B cannot carry a bias (an embedding, as in HF PEFT)."""
        for qualname in targets:
            module = model.get_submodule(qualname)
            base = module.base_layer if isinstance(module, LoRALayer) else module
            if not self.layer_class(base).takes_lora_bias:
                raise ConfigError(
                    f"lora_bias=True is not supported on {qualname!r} ({type(base).__name__}; HF PEFT refuses it "
                    "too): only linear-like layers and convolutions take a bias on B. Leave it out with "
                    f"exclude_modules=[{qualname!r}], or set lora_bias=False"
                )

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``target_modules`` (and no ``target_parameters``) omitted: those HF PEFT adapts on this architecture."""
        if self.target_modules or self.target_parameters:
            return self
        targets = default_for(LORA_TARGETS, model, type(self).__name__, "target_modules=[...]")
        return self.replace(target_modules=list(targets))

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, LoRALayer):  # a second adapter only on a wrapper LoRA itself would have made,
            cls = lora_layer_class(module.base_layer)  # or on its DoRA form (which runs plain LoRA adapters too)
            return cls is not None and (type(module) is cls or (module.takes_plain_lora and isinstance(module, cls)))
        return lora_layer_class(module) is not None

    def supported_layer_names(self) -> list[str]:
        return sorted(set(LINEAR_KINDS.names()) | set(LORA_LAYERS.names()))

    def layer_class(self, module: nn.Module) -> type[LoRALayer]:
        cls = lora_layer_class(module)
        assert cls is not None  # guaranteed by supports() during target resolution
        return cls

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, LoRALayer) else self.layer_class(module)(module)
        cast(_AddsAdapter, layer).add(
            adapter_name,
            self.rank_for(qualname),
            self.alpha_for(qualname),
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            # zero draws no random numbers (HF PEFT's stream); EVA and CorDA start as plain LoRA (pk.init_eva/_corda)
            init_A=self.init_A if self.init in (None, *DATA_INITS) else "zero",
            init_B=self.init_B if self.init in (None, *DATA_INITS) else "zero",
            dropout_position=self.dropout_position,
            lora_bias=self.lora_bias,
        )
        if self.init is not None:
            initialize(cast(LoRALinear, layer), adapter_name, self)  # linear-like: see check_targets
        if self.alora_invocation_tokens:
            activated.activate(layer, adapter_name, self.alora_invocation_tokens)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        from peftkit.core.state import get_state
        from peftkit.methods.grouped import plan_groups, share_down_projections

        train_biases(model, self.bias)
        state = get_state(model)
        if self.lora_bias:  # HF PEFT warns too: training and saving work, merging will not
            bare = [q for q in state.targets[name] if getattr(model.get_submodule(q), "bias", None) is None]
            if bare:
                logger.warning("adapter %r has lora_bias=True; it cannot be merged into layers without a bias: %s%s "
                               "(%d in all)", name, ", ".join(bare[:3]), " …" if len(bare) > 3 else "", len(bare))
        groups = plan_groups(self, model, state.targets[name])
        if groups:
            share_down_projections(model, name, groups)
        keys = lora_params.selected(self, model, state.targets[name], name)
        if groups or keys:  # the applied config records the exact groups and parameters
            state.configs[name] = self.replace(shared_A=groups or self.shared_A, target_parameters=keys)
        from peftkit.methods.lora_tokens import add_lora_tokens

        add_lora_tokens(model, name, self)
        replication.record(model, name)
        if self.alora_invocation_tokens:
            activated.attach(model, name, self)

    def remove(self, model: nn.Module, name: str) -> None:
        activated.detach(model, name)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Trained biases (``bias="all"``/``"lora_only"``) under their full HF PEFT keys."""
        paths = hf_module_paths(model, name)
        return {f"base_model.model.{paths[id(m)]}.bias": m.bias for m in bias_modules(model, self.bias)}

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "target_modules": hf_targets(targets, module_names),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": self.rank_pattern_for(targets + self.target_parameters, self.rank_pattern, self.rank),
            "alpha_pattern": self.rank_pattern_for(targets + self.target_parameters, self.alpha_pattern, self.alpha),
            "modules_to_save": list(self.modules_to_save) or None,
            "bias": self.bias,
            "trainable_token_indices": self.trainable_token_indices,
            "fan_in_fan_out": False,  # set by save_adapter when a target stores its weight transposed
            "init_lora_weights": self.init or True,
            "inference_mode": True,
            "lora_bias": self.lora_bias,
            "layer_replication": self.layer_replication,
            "alora_invocation_tokens": self.alora_invocation_tokens,
            "target_parameters": hf_parameters(self.target_parameters, module_names) or None,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "loftq_config": loftq_config(self),
            "base_model_name_or_path": None,
            "revision": None,
            **self.extra,
            **({"peftkit": self.peftkit_fields()} if self.peftkit_fields() else {}),
        }

    def peftkit_fields(self) -> dict[str, Any]:
        """Fields HF PEFT has no name for, kept in a ``peftkit`` section it ignores."""
        fields: dict[str, Any] = {}
        if self.dropout_position != "pre":
            fields["dropout_position"] = self.dropout_position
        if (self.init_A, self.init_B) != ("kaiming", "zero"):
            fields["init_A"], fields["init_B"] = self.init_A, self.init_B
        if self.shared_A:
            fields["shared_A"] = [list(g) for g in self.shared_A]
        return fields

    def rank_pattern_for(self, targets: list[str], pattern: dict[str, Any], default: Any) -> dict[str, Any]:
        """A pattern dict written with exact module names, which every HF PEFT version matches the same way."""
        if not pattern:
            return {}
        out = {}
        for name in targets:
            key = first_match(name, pattern)
            if key is not None and pattern[key] != default:
                out[name] = pattern[key]
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> LoRA:
        for flag, variant in LORA_VARIANTS.items():
            if data.get(flag) and cls is LoRA:
                return variant.from_hf_dict(data, module_names)
        unsupported = {k: data[k] for k in _HF_LORA_UNSUPPORTED if data.get(k)}
        if unsupported:
            field, value = next(iter(unsupported.items()))
            raise ConfigError(
                f"adapter_config.json sets {field}={value!r} ({_HF_LORA_UNSUPPORTED[field]}), an HF PEFT LoRA option "
                "peftkit does not support; load this adapter with HF PEFT, or save it without that option"
            )
        extra = {k: v for k, v in data.items() if k not in _HF_LORA_FIELDS and k != "peftkit"}
        targeted = data.get("target_parameters") or []
        hf = dict(
            target_modules=hf_layer_targets(data, module_names),  # the layer indices resolved, as HF PEFT does
            exclude_modules=hf_resolve(data.get("exclude_modules"), module_names),
            rank=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=hf_pattern(data.get("rank_pattern") or {}, module_names, bool(targeted)),
            alpha_pattern=hf_pattern(data.get("alpha_pattern") or {}, module_names, bool(targeted)),
            target_parameters=targeted,
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            bias=data.get("bias", "none") or "none",
            trainable_token_indices=data.get("trainable_token_indices"),
            lora_bias=bool(data.get("lora_bias", False)),
            layer_replication=data.get("layer_replication") or None,
            alora_invocation_tokens=data.get("alora_invocation_tokens"),
            init=init_from_hf(data.get("init_lora_weights")),
            **loftq_from_hf(data),
            task_type=data.get("task_type"),
            extra=extra,
        )
        ours = data.get("peftkit") or {}  # what peftkit_fields wrote (peftkit_config.json)
        allowed = {f.name for f in dataclasses.fields(cls)} - set(hf)
        if not isinstance(ours, dict) or set(ours) - allowed:
            raise ConfigError(
                f"peftkit's settings for this adapter ({ours!r}) must be an object with keys among {sorted(allowed)}; "
                "its peftkit_config.json is corrupt: delete it to load the adapter with HF PEFT's settings only"
            )
        return cls(**hf, **ours)


#: ``adapter_config.json`` flag → the LoRA variant it selects (``"use_dora"`` → DoRA), filled by variants.
LORA_VARIANTS: dict[str, type[LoRA]] = {}

#: HF PEFT LoRA options that change what the adapter computes and that peftkit does not implement: an adapter
#: setting one is refused when loaded (its tensors would not fit, or would load and compute something else).
_HF_LORA_UNSUPPORTED = {
    "use_qalora": "QA-LoRA's pooled input",
    "use_bdlora": "BD-LoRA's block-diagonal factors",
    "kasa_config": "KaSA's singular-value diagonal and truncated base weights",
    "monteclora_config": "MonteCLoRA's Monte Carlo sampler",
    "velora_config": "VeLoRA's compressed-activation projections",
    "arrow_config": "Arrow's routing between adapters",
}

_HF_LORA_FIELDS = frozenset(
    "peft_type task_type r lora_alpha lora_dropout use_rslora use_dora target_modules exclude_modules "
    "layers_to_transform layers_pattern rank_pattern alpha_pattern modules_to_save bias fan_in_fan_out "
    "init_lora_weights inference_mode trainable_token_indices lora_bias target_parameters layer_replication "
    "alora_invocation_tokens loftq_config".split()
)


def bias_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """Modules whose bias trains under ``bias=mode`` (each once: an adapter layer's is its base layer's; a bias on
    B, ``lora_bias``, is the adapter's own tensor, not one of these)."""
    if mode == "none":
        return []
    if mode == "lora_only":
        candidates = [m.base_layer for m in model.modules() if isinstance(m, LoRALayer)]
    else:
        factors = {id(m) for layer in model.modules() if isinstance(layer, LoRALayer)
                   for attr in layer.adapter_containers for m in getattr(layer, attr).modules()}
        candidates = [m for m in model.modules() if not isinstance(m, AdapterLayer) and id(m) not in factors]
    return [m for m in candidates if isinstance(getattr(m, "bias", None), nn.Parameter)]


def train_biases(model: nn.Module, mode: str) -> None:
    """Make the biases of ``bias=mode`` trainable, except those of a ``modules_to_save`` original: its adapter's copy
    trains in its place and the original stays frozen, as in HF PEFT (both are still saved, as HF PEFT saves them)."""
    originals = {id(wrapper.base_layer) for wrapper in model.modules() if isinstance(wrapper, ModulesToSave)}
    for module in bias_modules(model, mode):
        if id(module) not in originals:
            module.bias.requires_grad_(True)


def hf_module_paths(model: nn.Module, name: str) -> dict[int, str]:
    """Module id → its path under HF PEFT's names: inside a ``modules_to_save`` wrapper the original is
    ``original_module`` and adapter ``name``'s copy ``modules_to_save`` (another adapter's keeps its name after
    it, as HF PEFT writes them); everything else keeps its own path."""
    paths = {id(m): path for path, m in model.named_modules()}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            paths[id(module.base_layer)] = f"{path}.original_module"
            for adapter, copy in module.copies.items():
                paths[id(copy)] = f"{path}.modules_to_save" + ("" if adapter == name else f".{adapter}")
    return paths
