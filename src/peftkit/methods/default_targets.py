"""The modules LoRA, AdaLoRA and IA3 adapt when ``target_modules`` is omitted, per architecture.

Keyed by the model's ``config.model_type``, with the same defaults as Hugging Face PEFT
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_{LORA,ADALORA,IA3}_TARGET_MODULES_MAPPING`` and
``..._IA3_FEEDFORWARD_MODULES_MAPPING``), in peftkit's target syntax, where a name matches a module's dotted
suffix (``output.dense``) as in HF PEFT and HF PEFT's one regex becomes globs. ``pk.apply`` records the entries in
the adapter's config, so a saved adapter lists its targets explicitly.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from peftkit.errors import ConfigError

_QV = ("q_proj", "v_proj")
_QKV_FUSED = ("query_key_value",)

#: model_type → LoRA's (and DoRA's) default target_modules.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": _QV, "gpt2": ("c_attn",), "bloom": _QKV_FUSED,
    "blip-2": ("q", "v", "q_proj", "v_proj"), "opt": _QV, "gptj": _QV, "gpt_neox": _QKV_FUSED, "gpt_neo": _QV,
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "layoutlm": ("query", "value"), "llama": _QV, "llama4": _QV, "chatglm": _QKV_FUSED, "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",), "RefinedWebModel": _QKV_FUSED, "RefinedWeb": _QKV_FUSED, "falcon": _QKV_FUSED,
    "btlm": ("c_proj", "c_attn"), "codegen": ("qkv_proj",), "mistral": _QV, "mixtral": _QV, "stablelm": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"), "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "gemma4": ("*language_model.*.q_proj", "*language_model.*.v_proj"), "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"), "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

#: model_type → AdaLoRA's default target_modules.
ADALORA_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"), "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "gpt2": ("c_attn",), "bloom": _QKV_FUSED,
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "gptj": _QV, "gpt_neox": _QKV_FUSED,
    "gpt_neo": _QV, "llama": _QV, "llama4": _QV, "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"), "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",), "deberta": ("in_proj",), "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "gemma4": ("*language_model.*.q_proj", "*language_model.*.v_proj"), "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}

#: model_type → IA3's default (target_modules, feedforward_modules); the second are among the first.
IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t5": (("k", "v", "wo"), ("wo",)), "mt5": (("k", "v", "wi_1"), ()),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)), "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)), "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "llama4": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)), "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "RefinedWebModel": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWeb": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a ``transformers`` model, else ``None``."""
    value: Any = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) else None


def default_for(table: dict[str, Any], model: nn.Module, method: str, example: str, norms: bool = False) -> Any:
    """The entry of ``table`` for ``model``'s architecture.

    Args:
        table: one of the tables above.
        model: the model being adapted.
        method: the config class name, for the message (``"LoRA"``).
        example: how to pass targets, for the message (``"target_modules=[...]"``).
        norms: the method adapts norm layers (LN tuning): the message lists those instead of the linear layers.

    Raises:
        ConfigError: ``model`` has no ``config.model_type`` or one without defaults; the message names it and
            the model's linear (or norm) layers by leaf name.
    """
    kind = model_type(model)
    if kind in table:
        return table[kind]
    from peftkit.core.registry import linear_kind

    def candidate(m: nn.Module) -> bool:
        return "Norm" in type(m).__name__ if norms else linear_kind(m) is not None

    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and candidate(m)})
    what = f"model_type={kind!r}" if kind else f"{type(model).__name__} (it has no config.model_type)"
    listing = f"its {'norm' if norms else 'linear'} layers: {', '.join(leaves[:12]) or 'none'}"
    raise ConfigError(
        f"{method} has no default target_modules for {what}; pass {example}, naming modules of this model "
        f"({listing})" + ("" if norms else " or 'all-linear'")
    )


_Config = TypeVar("_Config")


def with_default_targets(config: _Config, model: nn.Module, table: dict[str, Any]) -> _Config:
    """``config`` where it names ``target_modules``; else a copy with ``table``'s entry for ``model``'s architecture
    (:func:`default_for`, whose error names the model's linear layers). What ``for_model`` does for most methods."""
    if config.target_modules:  # type: ignore[attr-defined]
        return config
    method = type(config).__name__
    return config.replace(  # type: ignore[attr-defined,no-any-return]
        target_modules=list(default_for(table, model, method, "target_modules=[...]")))
