"""X-LoRA: a mixture of trained LoRA experts, mixed per token by scalings a small classifier predicts.

Paper: Buehler and Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large Language
Models with Applications in Protein Mechanics and Molecular Design" (https://arxiv.org/abs/2402.07148). Hugging Face
PEFT 0.21.2's ``XLORA`` is the reference for everything below.

Each call runs the model twice. First a *scaling pass*, without gradients, in which every expert k of every adapted
layer ℓ is weighted by the constant ``scaling_pass_value``; the classifier (``xlora_depth`` linear layers of width
``xlora_size`` with ReLU and dropout between them) maps the last hidden state h_t of each token t to logits, one per
expert (per expert and layer with ``layerwise_scalings``), softmaxed at ``softmax_temperature`` when
``enable_softmax``::

    λ[t, ℓ, :] = softmax(classifier(h_t) / τ)                  (the same for every ℓ unless layerwise_scalings)

Then the real pass, in which an adapted ``nn.Linear`` computes, with expert k's own LoRA factors and scale s_k::

    y = W₀x + g · Σ_k s_k B_k A_k dropout_k(λ[t, ℓ, k] · x)     (g = global_scaling_weight)

(On an ``nn.Embedding`` λ scales the looked-up rows of A_kᵀ instead.) With ``top_k_lora`` only the k largest λ of each
token are kept (``enable_softmax_topk``: renormalised by a softmax over them). The experts are ordinary peftkit LoRA
adapters, loaded from the directories in ``adapters`` under the names ``<name>-<key>``; the X-LoRA adapter itself trains
only the classifier (and the experts with ``use_trainable_adapters``). Files, as HF PEFT's: ``adapter_config.json``
(``peft_type`` ``XLORA``, ``adapters`` mapping each key to its expert's directory) and ``adapter_model.safetensors``
holding only ``base_model.internal_xlora_classifier.layers.<i>.{weight,bias}``; peftkit also saves each expert in
``<dir>/<key>`` and points ``adapters`` there. The mixture is per token, so it cannot be folded into a weight:
``pk.merge`` refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.registry import register_method
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_names import hf_unknown_options
from peftkit.methods.lora_layers import LoRAEmbedding, LoRALayer, LoRALinear

logger = logging.getLogger("peftkit")

ATTR = "xlora_classifiers"
#: The classifier's key prefix in HF PEFT's file.
KEY_PREFIX = "base_model.internal_xlora_classifier."
#: The call arguments that carry a KV cache (``cache`` in transformers 5, ``past_key_values`` before).
_CACHES = ("cache", "past_key_values")
#: In a LoRA layer's ``__dict__``: X-LoRA adapter → (its classifier, the layer's number, its experts); and the
#: handles of the layers' and the model's hooks.
_MIXES, _LAYER_HOOK, _MODEL_HOOK = "_peftkit_xlora_mixes", "_peftkit_xlora_hook", "_peftkit_xlora_pass"
#: In the model's ``__dict__``: its ``generation_config.use_cache`` before X-LoRA turned it off.
_CACHED = "_peftkit_xlora_use_cache"
CONFIG_NAME = "adapter_config.json"


class XLoRAClassifier(nn.Module):
    """The scalings λ (batch, seq, layers, experts) from the last hidden state, and the routing the layers read."""

    def __init__(self, config: XLoRA, n_experts: int, n_layers: int, like: torch.Tensor) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        width = n_experts * n_layers if config.layerwise_scalings else n_experts
        sizes = [cast(int, config.hidden_size)] + [config.xlora_size] * (config.xlora_depth - 1)
        layers: list[nn.Module] = []
        dtype, device = like.dtype, like.device  # the model's first parameter's, as HF PEFT
        for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):  # drawn in HF PEFT's order
            layers += [nn.Linear(size_in, size_out, dtype=dtype, device=device), nn.ReLU()]
            layers += [nn.Dropout(config.xlora_dropout_p)] if config.xlora_dropout_p > 0 else []
        self.layers = nn.Sequential(*layers, nn.Linear(sizes[-1], width, dtype=dtype, device=device))
        #: What the layers mix with now: the scaling pass's constants, then the predicted scalings.
        self.routing: torch.Tensor | None = None
        #: The scalings of the latest call (HF PEFT's ``get_latest_scalings``).
        self.latest: torch.Tensor | None = None
        #: Whether its adapter is active (set by ``pk.set_adapter``).
        self.active = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[:2]
        logits: torch.Tensor = self.layers(hidden)
        if not self.config.layerwise_scalings:  # one prediction, shared by every layer
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings

    def layer_scalings(self, layer: int) -> torch.Tensor:
        """λ of adapted layer ``layer`` (batch, seq, experts), cut to the top k (and renormalised) if asked."""
        scalings = cast(torch.Tensor, self.routing)[:, :, layer, :]
        if self.config.top_k_lora is not None:
            top = torch.topk(scalings, k=self.config.top_k_lora, dim=-1).indices
            keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
            scalings = scalings * keep.to(scalings.dtype)
        if self.config.enable_softmax_topk:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return scalings


def _mix(layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """A LoRA layer's forward hook adding the mixed updates of the experts of each active X-LoRA adapter (the
    layer's own pass adds nothing for them: experts are never among its active adapters)."""
    lora = cast(LoRALayer, layer)
    if lora.disabled:
        return output
    x, dtype = args[0], output.dtype
    for classifier, number, experts in lora.__dict__[_MIXES].values():
        if not classifier.active:
            continue
        scalings = classifier.layer_scalings(number) if classifier.routing is not None else None
        weight = classifier.config.global_scaling_weight if scalings is not None else 1.0
        for k, expert in enumerate(experts):
            if lora.has_adapter(expert):
                share = scalings[:, :, k].unsqueeze(-1) if scalings is not None else None
                output = output + _update(lora, expert, x, share) * weight
    return output.to(dtype)


def _update(lora: LoRALayer, expert: str, x: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
    """Expert ``expert``'s update s·B A (λ·x) (``share``: λ, (batch, seq, 1); ``None``: 1). On an embedding the
    token ids cannot be scaled, so λ scales the looked-up rows of Aᵀ, as in HF PEFT."""
    if isinstance(lora, LoRAEmbedding):
        A, B = lora.factors(expert)
        rows = lora.embed(x, A.T)
        return lora.scaled(((rows * share if share is not None else rows) @ B.T) * lora.scaling[expert])
    return lora.row_update(expert, x * share if share is not None else x)


def _scaling_pass(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The model's forward pre-hook: one pass with constant scalings, whose last hidden state each active X-LoRA
    adapter's classifier maps to the scalings the real pass then mixes with."""
    table = cast(dict[str, XLoRAClassifier], cast(nn.Module, model._modules[ATTR])._modules)
    classifiers = [c for c in table.values() if c.active]
    if not classifiers or all(layer.disabled for _, layer in adapter_layers(model)):
        return
    cache = next((kwargs[k] for k in _CACHES if kwargs.get(k) is not None), None)
    if callable(getattr(cache, "get_seq_length", None)) and cast(Any, cache).get_seq_length() > 0:
        raise ConfigError("X-LoRA predicts its scalings from a pass over the whole sequence, which a KV cache "
                          "skips; call generate(..., use_cache=False), as HF PEFT does")
    ids = kwargs.get("input_ids", args[0] if args else None)
    shaped = ids if ids is not None else kwargs["inputs_embeds"]
    for classifier in classifiers:
        classifier.routing = torch.full(
            (shaped.shape[0], shaped.shape[1], classifier.n_layers, classifier.n_experts),
            classifier.config.scaling_pass_value, dtype=next(classifier.parameters()).dtype, device=shaped.device)
    passed = {k: v for k, v in kwargs.items() if k not in _CACHES}
    passed.update(output_hidden_states=True, return_dict=True, use_cache=False)
    with torch.no_grad():  # forward, not __call__: this hook must not run again
        hidden = model.forward(*args, **passed).hidden_states[-1]
    for classifier in classifiers:
        classifier.routing = classifier.latest = classifier(hidden)


@register_method
@dataclass
class XLoRA(AdapterConfig):
    """X-LoRA: trained LoRA experts mixed per token by a learned classifier (HF PEFT's ``XLoraConfig``, its defaults).

    Attributes:
        adapters: expert key → directory of a LoRA adapter (saved by peftkit or HF PEFT); the experts are mixed in
            this order. HF PEFT itself only works with the keys ``"0"``, ``"1"``, …
        hidden_size: the model's hidden size, the classifier's input (``None``: read from ``model.config``).
        enable_softmax: softmax the classifier's logits over the experts.
        enable_softmax_topk: renormalise the ``top_k_lora`` kept scalings by a softmax over them.
        layerwise_scalings: predict scalings per adapted layer instead of one set shared by every layer.
        xlora_depth: the classifier's number of linear layers.
        xlora_size: the classifier's hidden width (used when ``xlora_depth`` > 1).
        xlora_dropout_p: dropout between the classifier's layers (when ``xlora_depth`` > 1).
        use_trainable_adapters: train the experts as well as the classifier.
        softmax_temperature: τ of the softmax; lower gives sharper scalings.
        top_k_lora: keep only this many largest scalings per token (``None``: all experts, dense).
        scaling_pass_value: the constant scaling of every expert in the scaling pass (0: the base model's pass).
        global_scaling_weight: g, multiplies every expert's mixed update.

    Raises:
        ConfigError: a field out of range (named with its value); in ``pk.apply``, a ``hidden_size`` other than the
            model's, or an expert directory that does not hold a LoRA adapter.
        UnsupportedLayerError: in ``pk.apply``, an expert adapting a layer other than ``nn.Linear`` (or ``Conv1D``)
            or ``nn.Embedding``, or a DoRA expert.
    """

    peft_type = "XLORA"
    adds_heads: ClassVar[bool] = False

    adapters: Mapping[str, str] = field(default_factory=dict)
    hidden_size: int | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.adapters, Mapping) or not self.adapters or not all(
                isinstance(k, str) and k and "." not in k and isinstance(v, (str, Path))
                for k, v in self.adapters.items()):
            raise ConfigError(f"adapters={self.adapters!r} must map expert keys (non-empty, without '.') to LoRA "
                              "adapter directories, e.g. {'0': 'out/expert0', '1': 'out/expert1'}")
        self.adapters = {k: str(v) for k, v in self.adapters.items()}
        positive = {"xlora_depth": self.xlora_depth, "xlora_size": self.xlora_size}
        if self.hidden_size is not None:
            positive["hidden_size"] = self.hidden_size
        for key, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ConfigError(f"xlora_dropout_p={self.xlora_dropout_p!r} must be in [0, 1)")
        if not self.softmax_temperature > 0:
            raise ConfigError(f"softmax_temperature={self.softmax_temperature!r} must be positive (1.0: plain softmax)")
        top = self.top_k_lora
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(
                self.adapters)):
            raise ConfigError(f"top_k_lora={top!r} must be None (every expert) or an integer in [1, "
                              f"{len(self.adapters)}], the number of adapters")
        for key in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r} must be True or False")

    def experts(self, name: str) -> dict[str, str]:
        """Expert key → the name of its LoRA adapter on the model, for X-LoRA adapter ``name``."""
        return {key: f"{name}-{key}" for key in self.adapters}

    owned_adapters = experts  # what ``pk.save_adapter`` saves with this adapter rather than on its own

    # -- adding and removing ----------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> AdapterConfig:
        """With ``hidden_size`` filled in from the model's config (checked against it when given)."""
        size = getattr(getattr(model, "config", None), "hidden_size", None)
        if self.hidden_size is None and size is None:
            raise ConfigError(f"{type(model).__name__} has no config.hidden_size; pass XLoRA(hidden_size=...)")
        if size is not None and self.hidden_size not in (None, size):
            raise ConfigError(f"hidden_size={self.hidden_size} but the model's hidden size is {size}; pass "
                              f"hidden_size={size} (or leave it out)")
        return self.replace(hidden_size=self.hidden_size or size)

    def at_directory(self, directory: Path) -> XLoRA:
        """This config loaded from ``directory``: an expert whose path holds no adapter (the directory was moved)
        is read from ``directory/<key>``, where ``pk.save_adapter`` wrote it."""
        def located(key: str, path: str) -> str:
            beside = directory / key
            if not (Path(path) / CONFIG_NAME).is_file() and (beside / CONFIG_NAME).is_file():
                return str(beside)
            return path
        return cast(XLoRA, self.replace(adapters={k: located(k, p) for k, p in self.adapters.items()}))

    def inject(self, model: nn.Module, name: str) -> list[str]:
        from peftkit.core.inject import delete_adapter
        from peftkit.io.hf_format import load_adapter, read_config

        for key, path in self.adapters.items():  # checked before the model changes
            peft_type = read_config(path).get("peft_type")
            if peft_type != "LORA":
                raise ConfigError(f"adapters[{key!r}]={path!r} holds a {peft_type} adapter; X-LoRA mixes LoRA ones")
        loaded: list[str] = []
        try:
            for key, expert in self.experts(name).items():
                load_adapter(model, self.adapters[key], expert, activate=False)
                loaded.append(expert)
            layers = self._expert_layers(model, name)
        except Exception:
            for expert in reversed(loaded):
                delete_adapter(model, expert)
            raise
        classifier = XLoRAClassifier(self, len(self.adapters), len(layers), next(model.parameters()))
        if ATTR not in model._modules:
            model.add_module(ATTR, nn.ModuleDict())
        cast(nn.ModuleDict, model._modules[ATTR])[name] = classifier
        experts = list(self.experts(name).values())
        for number, layer in enumerate(layers):
            if _MIXES not in layer.__dict__:
                layer.__dict__[_MIXES] = {}
                layer.__dict__[_LAYER_HOOK] = layer.register_forward_hook(_mix)
            layer.__dict__[_MIXES][name] = (classifier, number, experts)
        if _MODEL_HOOK not in model.__dict__:
            model.__dict__[_MODEL_HOOK] = model.register_forward_pre_hook(_scaling_pass, with_kwargs=True)
            generation = getattr(model, "generation_config", None)
            if generation is not None:  # a cached step cannot be mixed: generate without a cache by default
                model.__dict__[_CACHED] = generation.use_cache
                generation.use_cache = False
        return []

    def _expert_layers(self, model: nn.Module, name: str) -> list[LoRALayer]:
        """The layers holding this adapter's experts, in module order (HF PEFT's layer numbers)."""
        experts = set(self.experts(name).values())
        layers = []
        for qualname, layer in adapter_layers(model):
            held = [e for e in experts if layer.has_adapter(e)]
            if not held:
                continue
            if type(layer) not in (LoRALinear, LoRAEmbedding):  # HF PEFT's Conv2d mixing is not (README)
                raise UnsupportedLayerError(
                    f"expert {held[0]!r} adapts {qualname} with a {type(layer).__name__}; X-LoRA mixes LoRA experts "
                    "on nn.Linear (and Conv1D) and nn.Embedding layers only, and not DoRA ones")
            layers.append(cast(LoRALayer, layer))
        return layers

    def on_set_active(self, model: nn.Module, name: str, active: bool) -> None:
        """The classifier trains while this adapter is active, the experts too with ``use_trainable_adapters``."""
        classifier = getattr(model._modules.get(ATTR), "_modules", {}).get(name)
        if classifier is not None:
            classifier.requires_grad_(active)
            classifier.active = active
        if self.use_trainable_adapters:
            for tensor in _expert_tensors(model, self.experts(name).values()):
                tensor.requires_grad_(active)

    def remove(self, model: nn.Module, name: str) -> None:
        from peftkit.core.inject import delete_adapter

        for _, layer in adapter_layers(model):
            mixes = layer.__dict__.get(_MIXES, {})
            mixes.pop(name, None)
            if _MIXES in layer.__dict__ and not mixes:
                layer.__dict__.pop(_LAYER_HOOK).remove()
                del layer.__dict__[_MIXES]
        classifiers = cast(nn.ModuleDict | None, model._modules.get(ATTR))
        if classifiers is not None and name in classifiers:
            del classifiers[name]
            if not len(classifiers):
                del model._modules[ATTR]
                model.__dict__.pop(_MODEL_HOOK).remove()
                if _CACHED in model.__dict__:
                    cast(Any, model).generation_config.use_cache = model.__dict__.pop(_CACHED)
        for expert in self.experts(name).values():
            if expert in get_state(model).configs:
                delete_adapter(model, expert)

    def check_merge(self, model: nn.Module, name: str) -> None:
        raise MergeError(f"X-LoRA adapters ({name!r}) mix their experts per token and cannot be merged into the "
                         "weights; keep them unmerged (merge=False)")

    # -- the files ---------------------------------------------------------------------------------
    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        classifier = cast(nn.ModuleDict, getattr(model, ATTR))[name]
        return {KEY_PREFIX + key: value for key, value in classifier.state_dict(keep_vars=True).items()}

    def companion_files(self, model: nn.Module, name: str, directory: Path,
                        config: dict[str, Any]) -> list[tuple[Path, dict[str, Any], dict[str, torch.Tensor]]]:
        """The experts, each in ``directory/<key>``; ``config`` (this adapter's) is pointed at them."""
        from peftkit.io.hf_format import adapter_config_dict, adapter_state_dict, file_tensors

        config["adapters"] = {key: str((directory / key).resolve()) for key in self.adapters}
        return [(directory / key, adapter_config_dict(model, expert),
                 file_tensors(model, expert, adapter_state_dict(model, expert)))
                for key, expert in self.experts(name).items()]

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        own = {f: getattr(self, f) for f in _HF_FIELDS}
        return {"peft_type": self.peft_type, "task_type": self.task_type, "inference_mode": True,
                "base_model_name_or_path": None, "revision": None, "auto_mapping": None, **own,
                "adapters": dict(self.adapters), **self.extra}

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> XLoRA:
        unknown = hf_unknown_options(data, _HF_FIELDS | {"adapters"}, "XLoRA")
        own = {f: data[f] for f in _HF_FIELDS if f in data}
        return cls(adapters=data.get("adapters") or {}, task_type=data.get("task_type"), **own,
                   extra={k: v for k, v in data.items() if k in unknown or k == "peft_version"})

    def fill_missing(self, model: nn.Module, name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` with the classifier tensors HF PEFT 0.21.2 leaves out of its file kept as initialised: it
        drops ``layers.<i>.*`` whenever ``i`` is an expert's name ("0", "1", … the only names it runs with)."""
        own = self.extra_tensors(model, name)
        missing = sorted(set(own) - set(weights))
        if missing:
            logger.warning("X-LoRA file lacks %s (HF PEFT drops classifier layers numbered like its experts); "
                           "they keep their initial values, as in HF PEFT", missing)
        return {**{k: own[k].detach() for k in missing}, **weights}


def _expert_tensors(model: nn.Module, experts: Any) -> list[torch.Tensor]:
    from peftkit.io.hf_format import adapter_state_dict

    return [t for e in experts if e in get_state(model).configs for t in adapter_state_dict(model, e).values()]


#: ``adapter_config.json`` fields of X-LoRA (besides HF PEFT's bookkeeping and ``adapters``).
_HF_FIELDS = frozenset(
    "hidden_size enable_softmax enable_softmax_topk layerwise_scalings xlora_depth xlora_size xlora_dropout_p "
    "use_trainable_adapters softmax_temperature top_k_lora scaling_pass_value global_scaling_weight".split())
