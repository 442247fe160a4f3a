"""Megatron-style role names (``linear_qkv``, ``linear_fc1``, ...) resolved per architecture, as data.

Megatron Core names the projections of a transformer block by role: ``linear_qkv`` (query, key and value),
``linear_proj`` (attention output), ``linear_fc1`` (the MLP's first layer; up and gate for gated MLPs) and
``linear_fc2``, plus the canonical parts ``linear_q``, ``linear_k``, ``linear_v``, ``linear_fc1_up`` and
``linear_fc1_gate`` (seed 000, Megatron Bridge PEFT guide). Each architecture here is a table: role →
regular expressions matched against the end of a module's qualified name (at a dot boundary), plus its fused
projections and how their output rows are laid out, so that canonical LoRA can split them into parts.
The feed-forward block (where parallel bottleneck adapters go) is the module holding ``linear_fc2``
(:func:`ffn_blocks`).

Add an architecture (or override one) with one call::

    pk.register_architecture("my_model", roles={"linear_qkv": ["attn.wq", "attn.wk", "attn.wv"], ...})
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftkit.core.matching import register_alias
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError

#: A fused projection's layout: model config → part name → the part's output rows, parts in order.
Layout = Callable[[Any], dict[str, torch.Tensor]]

#: Group role → its canonical part roles, in the order the parts are stacked.
GROUP_ROLES: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("linear_q", "linear_k", "linear_v"),
    "linear_fc1": ("linear_fc1_gate", "linear_fc1_up"),
}
#: Canonical part role → the part's name in a fused layout.
PART_OF_ROLE: dict[str, str] = {
    "linear_q": "q", "linear_k": "k", "linear_v": "v", "linear_fc1_gate": "gate", "linear_fc1_up": "up",
}
ROLE_NAMES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", *PART_OF_ROLE)


@dataclass(frozen=True)
class Architecture:
    """One architecture's role table.

    Attributes:
        roles: role name → regexes matched against the end of qualified module names (``"self_attn.q_proj"``).
        fused: regex of a fused projection → its :data:`Layout` (which output rows belong to which part).
        ffn_input: the positional argument of the feed-forward block (the parent of ``linear_fc2``) that
            carries the block's input: 0 for a self-contained MLP (Llama ``mlp``, T5 ``DenseReluDense``);
            1 for BERT, whose FFN starts in a sibling (``intermediate``) so that ``BertOutput(h, input_tensor)``
            receives the FFN's input as ``input_tensor``.
    """

    roles: Mapping[str, tuple[str, ...]]
    fused: Mapping[str, Layout] = field(default_factory=dict)
    ffn_input: int = 0


def blocks(groups: int, parts: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Rows of each part in an output made of ``groups`` repeated blocks, each holding the parts in order.

    ``blocks(1, [("q", 64), ("k", 16), ("v", 16)])`` is a contiguous GQA layout ``[q | k | v]``;
    ``blocks(n_heads, [("q", d), ("k", d), ("v", d)])`` is GPT-NeoX's per-head interleaving
    ``[q₀ k₀ v₀ | q₁ k₁ v₁ | …]``.
    """
    width = sum(n for _, n in parts)
    starts = torch.arange(groups) * width
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, n in parts:
        out[name] = (starts[:, None] + offset + torch.arange(n)[None, :]).reshape(-1)
        offset += n
    return out


def _head_dim(c: Any) -> int:
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _qkv_contiguous(c: Any) -> dict[str, torch.Tensor]:
    """``[q | k | v]`` with grouped-query sizes (Phi-3 ``qkv_proj``)."""
    d, kv = _head_dim(c), getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return blocks(1, [("q", c.num_attention_heads * d), ("k", kv * d), ("v", kv * d)])


def _gate_up(c: Any) -> dict[str, torch.Tensor]:
    """``[gate | up]`` (Phi-3 ``gate_up_proj``: ``gate, up = y.chunk(2)``)."""
    return blocks(1, [("gate", c.intermediate_size), ("up", c.intermediate_size)])


def _gpt2_qkv(c: Any) -> dict[str, torch.Tensor]:
    return blocks(1, [("q", c.n_embd), ("k", c.n_embd), ("v", c.n_embd)])


def _neox_qkv(c: Any) -> dict[str, torch.Tensor]:
    """GPT-NeoX views the output as (heads, 3·head_dim): per head ``[q k v]``."""
    d = c.hidden_size // c.num_attention_heads
    return blocks(c.num_attention_heads, [("q", d), ("k", d), ("v", d)])


def _falcon_qkv(c: Any) -> dict[str, torch.Tensor]:
    """Falcon's three layouts (``FalconAttention._split_heads``)."""
    heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    if c.new_decoder_architecture:  # per KV group: the group's query heads, then one k and one v head
        kv = c.num_kv_heads
        return blocks(kv, [("q", heads // kv * d), ("k", d), ("v", d)])
    if c.multi_query:  # all query heads, then the single k and v heads
        return blocks(1, [("q", heads * d), ("k", d), ("v", d)])
    return blocks(heads, [("q", d), ("k", d), ("v", d)])


_LLAMA = Architecture(roles={
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_q": ("q_proj",), "linear_k": ("k_proj",),
    "linear_v": ("v_proj",), "linear_proj": ("o_proj",), "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc1_gate": ("gate_proj",), "linear_fc1_up": ("up_proj",), "linear_fc2": ("down_proj",),
})
_GPT2 = Architecture(
    roles={"linear_qkv": (r"attn\.c_attn",), "linear_q": (r"attn\.c_attn",), "linear_k": (r"attn\.c_attn",),
           "linear_v": (r"attn\.c_attn",), "linear_proj": (r"attn\.c_proj",), "linear_fc1": (r"mlp\.c_fc",),
           "linear_fc2": (r"mlp\.c_proj",)},
    fused={r"attn\.c_attn": _gpt2_qkv},
)


def _qkv_fused(prefix: str, qkv: str, proj: str, fc1: str, fc2: str, layout: Layout) -> Architecture:
    attn = rf"{prefix}\.{qkv}"
    return Architecture(
        roles={"linear_qkv": (attn,), "linear_q": (attn,), "linear_k": (attn,), "linear_v": (attn,),
               "linear_proj": (rf"{prefix}\.{proj}",), "linear_fc1": (fc1,), "linear_fc2": (fc2,)},
        fused={attn: layout},
    )


_NEOX = _qkv_fused("attention", "query_key_value", "dense", r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h", _neox_qkv)
_FALCON = _qkv_fused("self_attention", "query_key_value", "dense", r"mlp\.dense_h_to_4h", r"mlp\.dense_4h_to_h",
                     _falcon_qkv)
_PHI3 = Architecture(
    roles={"linear_qkv": (r"self_attn\.qkv_proj",), "linear_q": (r"self_attn\.qkv_proj",),
           "linear_k": (r"self_attn\.qkv_proj",), "linear_v": (r"self_attn\.qkv_proj",),
           "linear_proj": (r"self_attn\.o_proj",), "linear_fc1": (r"mlp\.gate_up_proj",),
           "linear_fc1_gate": (r"mlp\.gate_up_proj",), "linear_fc1_up": (r"mlp\.gate_up_proj",),
           "linear_fc2": (r"mlp\.down_proj",)},
    fused={r"self_attn\.qkv_proj": _qkv_contiguous, r"mlp\.gate_up_proj": _gate_up},
)
_T5_ATTN = r"(?:SelfAttention|EncDecAttention)"
_T5 = Architecture(roles={
    "linear_qkv": (rf"{_T5_ATTN}\.[qkv]",), "linear_q": (rf"{_T5_ATTN}\.q",), "linear_k": (rf"{_T5_ATTN}\.k",),
    "linear_v": (rf"{_T5_ATTN}\.v",), "linear_proj": (rf"{_T5_ATTN}\.o",),
    "linear_fc1": (r"DenseReluDense\.wi(?:_0|_1)?",), "linear_fc1_gate": (r"DenseReluDense\.wi_0",),
    "linear_fc1_up": (r"DenseReluDense\.wi_1",), "linear_fc2": (r"DenseReluDense\.wo",),
})
_BERT = Architecture(roles={
    "linear_qkv": (r"attention\.self\.(?:query|key|value)",), "linear_q": (r"attention\.self\.query",),
    "linear_k": (r"attention\.self\.key",), "linear_v": (r"attention\.self\.value",),
    "linear_proj": (r"attention\.output\.dense",), "linear_fc1": (r"intermediate\.dense",),
    # The block's output projection, not the attention's (``layer.3.output.dense``).
    "linear_fc2": (r"layer\.\d+\.output\.dense",),
}, ffn_input=1)

#: ``config.model_type`` → role table. Extend with :func:`register_architecture`.
ARCHITECTURES: dict[str, Architecture] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo"), _LLAMA),
    "gpt2": _GPT2, "gpt_neox": _NEOX, "falcon": _FALCON, "phi3": _PHI3,
    **dict.fromkeys(("t5", "mt5"), _T5), **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
}


def register_architecture(
    model_type: str, roles: Mapping[str, Sequence[str]], fused: Mapping[str, Layout] | None = None,
    ffn_input: int = 0,
) -> None:
    """Make role names usable on models whose ``config.model_type`` is ``model_type`` (replacing any table).

    Args:
        model_type: the value of ``model.config.model_type``.
        roles: role name (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``, ``linear_q``, ...) →
            regexes matched against the end of a qualified module name, e.g. ``{"linear_proj": ["attn.wo"]}``.
        fused: regex of a fused projection → function of the model config returning each part's output rows
            (see :func:`blocks`); needed for canonical LoRA on fused layers.
        ffn_input: which positional argument of the feed-forward block (the parent of ``linear_fc2``) is the
            block's input (see :class:`Architecture`); 0 for a self-contained MLP.

    Raises:
        ConfigError: an unknown role name, or a negative ``ffn_input``.
    """
    unknown = sorted(set(roles) - set(ROLE_NAMES))
    if unknown:
        raise ConfigError(f"unknown role names {unknown} for {model_type!r}; role names are {list(ROLE_NAMES)}")
    if isinstance(ffn_input, bool) or not isinstance(ffn_input, int) or ffn_input < 0:
        raise ConfigError(f"ffn_input={ffn_input!r} must be a non-negative argument position (0: the block's input)")
    ARCHITECTURES[model_type] = Architecture({k: tuple(v) for k, v in roles.items()}, dict(fused or {}), ffn_input)


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (``transformers`` models), or ``None``."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) else None


def architecture(model: nn.Module, role: str = "linear_qkv") -> Architecture:
    """The role table of ``model``.

    Raises:
        ConfigError: the architecture has no table; the message names the supported ones and the call to add one.
    """
    kind = model_type(model)
    if kind in ARCHITECTURES:
        return ARCHITECTURES[kind]
    raise ConfigError(
        f"role name {role!r} needs a role table for the model's architecture, but {type(model).__name__} "
        f"(model_type={kind!r}) has none; supported architectures: {', '.join(sorted(ARCHITECTURES))}. "
        f"Add one with pk.register_architecture({kind or 'MODEL_TYPE'!r}, "
        f"roles={{{role!r}: ['<module name>', ...], ...}}) "
        + ("(it reads model.config.model_type, so give a plain module a `config` with a `model_type`) "
           if kind is None else "")
        + "or target the modules by name."
    )


def _suffix(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?:^|\.)(?:{pattern})$")


def role_modules(model: nn.Module, role: str) -> list[str]:
    """Qualified names of the modules ``role`` stands for on ``model``, in model order.

    Raises:
        ConfigError: unknown architecture, or an architecture without that role.
    """
    arch = architecture(model, role)
    patterns = arch.roles.get(role)
    if not patterns:
        raise ConfigError(
            f"role {role!r} is not defined for model_type {model_type(model)!r} (it has {sorted(arch.roles)}); "
            "use one of those or target the modules by name"
        )
    regexes = [_suffix(p) for p in patterns]
    return [n for n, _ in iter_modules(model) if n and any(r.search(n) for r in regexes)]


def role_table(model: nn.Module) -> dict[str, list[str]]:
    """Every role of ``model``'s architecture → its module names (empty when the architecture is unknown)."""
    if model_type(model) not in ARCHITECTURES:
        return {}
    return {role: role_modules(model, role) for role in ARCHITECTURES[model_type(model) or ""].roles}


def ffn_blocks(model: nn.Module) -> dict[str, int]:
    """The feed-forward blocks of ``model`` (the parents of ``linear_fc2``) → the argument holding their input.

    Raises:
        ConfigError: unknown architecture or no ``linear_fc2`` role; or a parent that also holds attention
            projections (then it is a whole transformer block, not a feed-forward block).
    """
    arch = architecture(model, "linear_fc2")
    attention = [n for role in ("linear_qkv", "linear_proj") if role in arch.roles for n in role_modules(model, role)]
    out: dict[str, int] = {}
    for name in role_modules(model, "linear_fc2"):
        parent = name.rpartition(".")[0]
        inside = [a for a in attention if a.startswith(parent + ".") or not parent]
        if inside:
            raise ConfigError(
                f"the parent of {name} ({parent or 'the model'}) also holds the attention projection {inside[0]}, so "
                "it is not a feed-forward block; target the feed-forward blocks by name instead"
            )
        out[parent] = arch.ffn_input
    return out


def fused_layout(model: nn.Module, qualname: str, out_features: int | None = None) -> dict[str, torch.Tensor] | None:
    """Row indices of each logical part of the fused projection ``qualname``, or ``None`` if it is not fused.

    Raises:
        ConfigError: the layout does not cover exactly ``out_features`` rows (a config that does not fit the model).
    """
    arch = ARCHITECTURES.get(model_type(model) or "")
    if arch is None:
        return None
    for pattern, layout in arch.fused.items():
        if _suffix(pattern).search(qualname):
            parts = layout(model.config)
            rows = torch.cat(list(parts.values()))
            if out_features is not None and (len(rows) != out_features or len(set(rows.tolist())) != out_features):
                raise ConfigError(
                    f"the part layout of {qualname} ({ {k: len(v) for k, v in parts.items()} }) does not cover its "
                    f"{out_features} output rows; fix the layout with pk.register_architecture"
                )
            return parts
    return None


def _alias(role: str) -> Callable[[nn.Module], list[str]]:
    return lambda model: role_modules(model, role)


for _role in ROLE_NAMES:
    register_alias(_role, _alias(_role))
