"""Prompt tuning, and the in-place hooks every prompt-learning method (prompt, prefix, P-tuning) shares.

Paper: Lester, Al-Rfou and Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning",
EMNLP 2021 (https://arxiv.org/abs/2104.08691).

For input embeddings E(x) ∈ ℝ^{n×d} and a learned table P ∈ ℝ^{m×d} of m virtual tokens::

    model(x) = f([P ; E(x)])          attention mask [1ₘ ; mask],  labels [-100ₘ ; labels]

How it hooks into the user's model (peftkit has no wrapper class): the tables live in one
:class:`PromptLearningLayer`, an adapter layer attached as ``model.prompt_encoder`` that is never called
by the model itself; a forward pre-hook (with keyword arguments) on the top model rewrites each call's
inputs for the active prompt adapter: token ids become embeddings with the prompt in front, masks and
labels grow by m, position ids are dropped so the model counts positions over the longer input. For
encoder-decoder models a second pre-hook on the encoder prepends the prompt (``generate()`` calls the
encoder directly). Because the layer is an adapter layer, ``set_adapter``, ``disable_adapters`` and
``delete_adapter`` work as for LoRA, and ``merge`` is an error: virtual tokens are not a weight.
Matches Hugging Face PEFT 0.21 (``PROMPT_TUNING``: one key, ``prompt_embeddings``; encoder-decoder
models get a 2m-row table of which the encoder uses the first m, as there).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.errors import AdapterStateError, ConfigError, MergeError
from peftkit.io.hf_names import hf_modules_to_save

ATTR = "prompt_encoder"
_HANDLES = "_peftkit_prompt_hooks"
_GENERATION = "prepare_inputs_for_generation"  # an instance attribute shadowing the model's method (_PassTaskIds)


def model_dims(model: nn.Module) -> dict[str, int]:
    """Hidden size, layers and heads from a ``transformers`` config, as HF PEFT reads them."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} has no .config; prompt learning needs a transformers model")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def first(*names: str) -> int:
        for n in names:
            if getattr(cfg, n, None) is not None:
                return int(getattr(cfg, n))
        raise ConfigError(f"cannot read any of {names} from {type(cfg).__name__}")

    return {"token_dim": first("hidden_size", "n_embd", "d_model"),
            "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
            "num_heads": first("num_attention_heads", "n_head", "num_heads")}


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's token embedding (``transformers``' ``get_input_embeddings()``).

    Raises:
        ConfigError: the model has no ``get_input_embeddings``.
    """
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise ConfigError(f"{type(model).__name__} has no get_input_embeddings(); prompt learning needs a "
                          "transformers model")
    return cast(nn.Embedding, get())


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def task_of(model: nn.Module) -> str:
    """``"seq2seq"``, ``"cls"`` (sequence classification: labels are per sequence) or ``"causal"``."""
    if is_seq2seq(model):
        return "seq2seq"
    return "cls" if type(model).__name__.endswith("ForSequenceClassification") else "causal"


class PromptEmbedding(nn.Module):
    """The virtual-token table of one prompt-tuning adapter: ``embedding.weight`` is P."""

    def __init__(self, total_tokens: int, token_dim: int, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(total_tokens, token_dim)

    def prompt(self) -> torch.Tensor:
        """The virtual tokens' embeddings, (total tokens, d); the encoder of an encoder-decoder uses the first m."""
        return self.embedding.weight

    def saved_table(self) -> torch.Tensor:
        return self.embedding.weight

    def batch_prompt(self, batch: int) -> torch.Tensor:
        """The m virtual tokens put in front of each of ``batch`` inputs, (batch, m, d)."""
        return self.prompt()[: self.num_virtual_tokens].expand(batch, -1, -1)

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Rewrite the top model's keyword arguments in place (see the module docstring)."""
        m, task = self.num_virtual_tokens, task_of(model)
        # The encoder's output always has the m virtual positions, so its mask (used by the
        # cross-attention too) grows on every call, including generate()'s decoding steps.
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), m)
        if task == "seq2seq":
            return  # the encoder hook prepends the prompt
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return
        batch = ref.shape[0]
        kwargs.pop("position_ids", None)  # positions are counted over the longer input (as HF PEFT)
        kwargs.pop("cache_position", None)
        cache = kwargs.get(cache_key(model)) or kwargs.get("past_key_values")
        if cache is not None and cache_length(cache) > 0:
            return  # decoding: the prompt is in the cache already
        if embeds is None:
            embeds = input_embeddings(model)(ids)
        kwargs["inputs_embeds"] = torch.cat([self.batch_prompt(batch).to(embeds.dtype), embeds], dim=1)
        kwargs["input_ids"] = None
        labels = kwargs.get("labels")
        if task == "causal" and labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, m), -100), labels], dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, m), types], dim=1) if task == "cls" else None

    def prepare_encoder(self, encoder: nn.Module, kwargs: dict[str, Any]) -> None:
        """Prepend the prompt to an encoder's input (encoder-decoder models)."""
        m = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = input_embeddings(encoder)(ids)
        length = embeds.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
            kwargs["attention_mask"] = extend_mask(mask, m)
        kwargs["inputs_embeds"] = torch.cat([self.prompt()[:m].expand(embeds.shape[0], -1, -1)
                                             .to(embeds.dtype), embeds], dim=1)
        kwargs["input_ids"] = None


def extend_mask(mask: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """A 2-D attention mask with m ones in front (other masks are left to the model)."""
    if mask is None or mask.dim() != 2:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)


def cache_key(model: nn.Module) -> str:
    """The model's name for its KV cache argument (``cache`` in recent ``transformers``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_length(cache: Any) -> int:
    cache = getattr(cache, "self_attention_cache", cache)
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


class PromptLearningLayer(AdapterLayer):
    """Holds every prompt-learning adapter of a model; attached as ``model.prompt_encoder``."""

    adapter_containers = ("prompt_modules",)

    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.prompt_modules = nn.ModuleDict()

    def current(self) -> nn.Module | None:
        """The active prompt adapter's module, or ``None`` when none is active (or adapters are disabled)."""
        names = self._applied()
        if len(names) > 1:
            raise AdapterStateError(
                f"prompt-learning adapters {names} are active together; their virtual tokens cannot be combined. "
                "Activate one of them with pk.set_adapter."
            )
        return self.prompt_modules[names[0]] if names else None

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The module's ``trainable_parameters()`` where it has frozen ones too (CPT's context table), else all."""
        if name in self.prompt_modules:
            module = self.prompt_modules[name]
            own = getattr(module, "trainable_parameters", None)
            yield from own() if own is not None else module.parameters()

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {}  # saved under HF PEFT's bare key by the config's ``extra_tensors``

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the prompt encoder is applied through hooks on the model, not called directly")

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        raise MergeError(
            f"prompt-learning adapters {list(names)} cannot be merged: virtual tokens (prompt, prefix, P-tuning) add "
            "inputs to the model rather than change a weight. Keep them as adapters, or use LoRA to merge."
        )


def _bind(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of ``fn`` turned into keyword arguments."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args, strict=False)), **kwargs}


class _PromptModule(Protocol):
    """What a prompt module (:class:`PromptEmbedding`, prefix tuning's ``PrefixEncoder``) holds: its table."""

    def saved_table(self) -> torch.Tensor: ...


class _EncoderDecoder(Protocol):
    def get_encoder(self) -> nn.Module: ...


#: A forward pre-hook with keyword arguments.
PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]


def _hook(layer: PromptLearningLayer, step: str) -> PreHook:
    """A pre-hook letting the active prompt module's method ``step`` rewrite a call's arguments (if it has one)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        prepare = getattr(layer.current(), step, None)
        if prepare is None:
            if "task_ids" in kwargs:  # adapters disabled: the multitask prompt's selector is not the model's
                return args, {k: v for k, v in kwargs.items() if k != "task_ids"}
            return None
        kwargs = _bind(mod.forward, args, kwargs)
        prepare(mod, kwargs)
        return (), kwargs

    return hook


class _PassTaskIds:
    """The model's ``prepare_inputs_for_generation``, also taking ``task_ids`` and handing them to each forward
    call (whose pre-hook takes them out again), so that ``model.generate(..., task_ids=...)`` works for
    multi-task prompts as in HF PEFT. ``transformers`` accepts only the generation arguments this signature
    names, so it is the wrapped method's own plus ``task_ids``."""

    def __init__(self, inner: Callable[..., dict[str, Any]]) -> None:
        self.inner = inner
        self.users: set[str] = set()  # the methods reading task_ids (see pass_task_ids)
        params = list(inspect.signature(inner).parameters.values())
        if all(p.name != "task_ids" for p in params):
            at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        self.__signature__ = inspect.Signature(params)

    def __call__(self, *args: Any, task_ids: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        inputs = self.inner(*args, **kwargs)
        if task_ids is not None:
            inputs["task_ids"] = task_ids
        return inputs


def pass_task_ids(model: nn.Module, user: str) -> None:
    """Let ``model.generate(..., task_ids=...)`` hand ``task_ids`` to each forward call (:class:`_PassTaskIds`), for
    the method ``user`` (multi-task prompts, Poly), whose forward pre-hook takes them out again."""
    current = model.__dict__.get(_GENERATION)
    if not isinstance(current, _PassTaskIds):
        prepare_generation = getattr(model, _GENERATION, None)
        if not callable(prepare_generation):
            return  # the model does not generate
        current = model.__dict__[_GENERATION] = _PassTaskIds(prepare_generation)
    current.users.add(user)


def has_prompt_hooks(model: nn.Module) -> bool:
    """Whether prompt-learning hooks are on ``model``: their pre-hook takes ``task_ids`` out of its calls."""
    return _HANDLES in model.__dict__


def check_task_ids(ids: Any, batch: int) -> torch.Tensor:
    """``ids``, checked to be one integer task index per example of a ``batch``-example call.

    Raises:
        ConfigError: ``ids`` is not an integer tensor of shape (batch,).
    """
    if not isinstance(ids, torch.Tensor):
        raise ConfigError(f"task_ids={ids!r} is a {type(ids).__name__}: pass an integer tensor of shape "
                          f"({batch},), one task index per example, e.g. torch.tensor([0, 1])")
    if ids.dim() != 1 or ids.shape[0] != batch or ids.dtype not in (torch.long, torch.int32):
        raise ConfigError(f"task_ids of shape {tuple(ids.shape)} and dtype {ids.dtype}: pass an integer tensor "
                          f"of shape ({batch},), one task index per example")
    return ids


def stop_passing_task_ids(model: nn.Module, user: str) -> None:
    """Undo :func:`pass_task_ids` for ``user``; the model's own method comes back when no method needs it."""
    current = model.__dict__.get(_GENERATION)
    if isinstance(current, _PassTaskIds):
        current.users.discard(user)
        if not current.users:
            del model.__dict__[_GENERATION]


def attach(model: nn.Module, name: str, module: nn.Module) -> None:
    """Add prompt module ``name`` to the model's prompt encoder, installing the hooks on first use."""
    layer = getattr(model, ATTR, None)
    if not isinstance(layer, PromptLearningLayer):
        if layer is not None:
            raise ConfigError(f"{type(model).__name__} already has an attribute {ATTR!r}; cannot attach prompts")
        layer = PromptLearningLayer()
        setattr(model, ATTR, layer)

        handles = [model.register_forward_pre_hook(_hook(layer, "prepare"), with_kwargs=True)]
        if is_seq2seq(model):
            encoder = cast(_EncoderDecoder, model).get_encoder()
            handles.append(encoder.register_forward_pre_hook(_hook(layer, "prepare_encoder"), with_kwargs=True))
        backbone = getattr(model, "base_model", model)
        top_params = inspect.signature(model.forward).parameters
        if backbone is not model and "cache" not in top_params and "past_key_values" not in top_params:
            # A head that takes no KV cache (BERT classifiers): prefix tuning goes through the backbone.
            handles.append(backbone.register_forward_pre_hook(_hook(layer, "prepare_backbone"), with_kwargs=True))
        model.__dict__[_HANDLES] = handles
        pass_task_ids(model, "prompt")
    ref = input_embeddings(model).weight
    layer.prompt_modules[name] = module.to(device=ref.device)


def detach(model: nn.Module, name: str) -> None:
    """Remove prompt module ``name``; the last one takes the hooks and ``model.prompt_encoder`` with it."""
    layer = model._modules.get(ATTR)
    if isinstance(layer, PromptLearningLayer):
        if name in layer.prompt_modules:
            del layer.prompt_modules[name]
        if len(layer.prompt_modules):
            return
    # ``delete_adapter``/``unload`` may already have swapped the emptied layer for its placeholder.
    for handle in model.__dict__.pop(_HANDLES, []):
        handle.remove()
    stop_passing_task_ids(model, "prompt")
    if ATTR in model._modules:
        del model._modules[ATTR]


class PromptLearningConfig(AdapterConfig):
    """What every prompt-learning method (prompt, prefix, P-tuning, multi-task) shares: its module lives in the
    model's :class:`PromptLearningLayer`, its keys carry HF PEFT's ``base_model.`` prefix, and its file holds the
    prompt table."""

    key_prefix: ClassVar[str] = "base_model."

    def remove(self, model: nn.Module, name: str) -> None:
        detach(model, name)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        return saved_table(model, name)


@register_method
@dataclass
class PromptTuning(PromptLearningConfig):
    """Learned virtual tokens in front of the input.

    Attributes:
        num_virtual_tokens: m, the number of virtual tokens.
        init: ``"random"`` (normal, as ``nn.Embedding``), ``"text"`` (the embeddings of ``init_text``,
            repeated or cut to m tokens) or ``"sample_vocab"`` (embeddings of random vocabulary tokens).
        init_text: the text for ``init="text"``.
        tokenizer: a ``transformers`` tokenizer (or anything callable returning ``{"input_ids": [...]}``)
            for ``init="text"``.
    """

    peft_type = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        if self.init not in ("random", "text", "sample_vocab"):
            raise ConfigError(f"init={self.init!r} must be 'random', 'text' or 'sample_vocab'")
        if self.init == "text" and (not self.init_text or self.tokenizer is None):
            raise ConfigError("init='text' needs init_text='...' and tokenizer=<a tokenizer> to embed it")

    def inject(self, model: nn.Module, name: str) -> list[str]:
        dims = model_dims(model)
        total = self.num_virtual_tokens * (2 if is_seq2seq(model) else 1)
        module = PromptEmbedding(total, dims["token_dim"], self.num_virtual_tokens)
        words = input_embeddings(model)
        init_ids = self.init_token_ids(total, words.num_embeddings)
        if init_ids is not None:
            with torch.no_grad():
                module.embedding.weight.copy_(words(init_ids.to(words.weight.device)).float())
        attach(model, name, module)
        return [ATTR]

    def init_token_ids(self, total: int, vocab: int) -> torch.Tensor | None:
        if self.init == "sample_vocab":
            return torch.randint(0, vocab, (total,))
        if self.init != "text":
            return None
        return text_token_ids(self.tokenizer, cast(str, self.init_text), total, vocab)

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        hf_init = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}[self.init]
        init, tokenizer = hf_init_fields(hf_init, self.tokenizer)
        own = {
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": tokenizer,
            "tokenizer_kwargs": None,
        }
        return hf_prompt_dict(self, self.num_virtual_tokens, own, _HF_PROMPT_FIELDS)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> PromptTuning:
        # The table is read from the file, so the initialisation is irrelevant on load.
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), task_type=data.get("task_type"),
                   modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
                   extra={k: v for k, v in data.items() if k not in _HF_PROMPT_FIELDS})


_HF_PROMPT_FIELDS = frozenset(
    "peft_type task_type num_virtual_tokens prompt_tuning_init prompt_tuning_init_text tokenizer_name_or_path "
    "tokenizer_kwargs inference_mode modules_to_save".split()
)


def hf_init_fields(init: str, tokenizer: Any) -> tuple[str, str | None]:
    """HF PEFT's ``prompt_tuning_init`` and ``tokenizer_name_or_path`` for an adapter initialised as ``init``.

    HF PEFT refuses to load a ``TEXT`` init without a tokenizer path, although loading reads the table from the
    file and never runs the init; so a text init from a tokenizer without a ``name_or_path`` (a function, or one
    built in memory) is written as ``RANDOM``, with ``prompt_tuning_init_text`` kept as the record of the text.
    """
    name = getattr(tokenizer, "name_or_path", None) or None
    return ("RANDOM" if init == "TEXT" and name is None else init), name


def text_token_ids(tokenizer: Any, text: str, total: int, vocab: int) -> torch.Tensor:
    """The token ids of ``text``, repeated then cut to ``total`` (HF PEFT's ``TEXT`` initialisation).

    Raises:
        ConfigError: the tokenizer gives no ids for ``text``, or ids outside the model's ``vocab`` embeddings.
    """
    ids = [int(i) for i in tokenizer(text)["input_ids"]]
    if not ids:
        raise ConfigError(f"the tokenizer turns init_text={text!r} into no tokens; give a text it tokenizes")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"the tokenizer gives init_text={text!r} token ids {bad[:5]} outside the model's "
                          f"{vocab} input embeddings; pass the tokenizer that belongs to the model")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


def saved_table(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Prompt module ``name``'s table under HF PEFT's one key (a prompt-learning config's ``extra_tensors``)."""
    layer = cast(PromptLearningLayer, getattr(model, ATTR))
    return {"prompt_embeddings": cast(_PromptModule, layer.prompt_modules[name]).saved_table()}


def hf_prompt_dict(
    config: AdapterConfig, num_virtual_tokens: int, own: dict[str, Any], known: Collection[str]
) -> dict[str, Any]:
    """A prompt-learning ``adapter_config.json``: the shared fields around the method's ``own``, then the
    config's ``extra`` fields (those not in ``known``), in HF PEFT's order."""
    return {
        "peft_type": config.peft_type,
        "task_type": config.task_type,
        "num_virtual_tokens": num_virtual_tokens,
        **own,
        "modules_to_save": list(config.modules_to_save) or None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **{k: v for k, v in config.extra.items() if k not in known},
    }


def check_virtual_tokens(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"num_virtual_tokens={value!r} must be a positive integer (e.g. 20)")
