"""LLaMA-Adapter: gated adaption prompts in the top attention layers.

Paper: Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention", 2023
(https://arxiv.org/abs/2303.16199).

Each of the top ``adapter_layers`` attention layers learns a prompt P ∈ ℝ^{L×d} (L = ``adapter_len``) and a
scalar gate g, zero at the start. The layer's own keys and values project the prompt, its queries attend over
it with a separate softmax, and the gated result is added to the layer's output::

    attn(x) + O( g · softmax(Q_x K_Pᵀ / √d_head) V_P )      K_P = P W_k,  V_P = P W_v

with Q_x the layer's (rotary-embedded) queries and O its output projection. As in Hugging Face PEFT 0.21.2
(``ADAPTION_PROMPT``) the prompt's keys get no rotary embedding, every query sees every prompt token (no mask),
grouped-query key/value heads are repeated, and on GPT-2 the term is added after ``c_proj`` without passing
through it. P starts standard normal (the official repository's ``nn.Embedding``), g at 0, so a new adapter
leaves the model's output unchanged.

The attention module (``self_attn`` on Llama and Mistral, ``attn`` on GPT-2: the architectures HF PEFT 0.21.2
supports) is wrapped by an :class:`AdaptionPromptLayer` that calls it unchanged and adds the term; generation
with a KV cache works as is, since the prompt is not in the cache. File keys are HF PEFT's
``…<attention>.adaption_prompt`` (1, L, d) and ``….adaption_gate`` (1,), without the adapter name. Active
adapters are summed (HF PEFT activates one at a time); a prompt is no weight, so merging is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.matching import matches, near_misses
from peftkit.core.registry import register_method
from peftkit.core.walk import iter_modules
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError

#: model_type → the attention modules HF PEFT 0.21.2 wraps (its ``TRANSFORMERS_MODEL_CONFIG``).
ADAPTION_PROMPT_TARGETS = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


def _is_gpt2(attention: nn.Module) -> bool:
    """GPT-2's attention computes queries, keys and values in one ``c_attn``; Llama's has q/k/v/o projections."""
    return hasattr(attention, "c_attn")


def _is_attention(module: nn.Module) -> bool:
    names = ("c_attn",) if _is_gpt2(module) else ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(hasattr(module, n) for n in (*names, "config", "head_dim"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_queries(attention: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Llama's rotary-embedded queries (batch, heads, n, d_head), recomputed: its forward does not return them."""
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None:
        raise RuntimeError(f"{type(attention).__name__} was called without position_embeddings; adaption prompts "
                           "need the (cos, sin) rotary tables that transformers' decoder layers pass")
    cos, sin = embeddings[0].unsqueeze(1), embeddings[1].unsqueeze(1)
    batch, n, _ = hidden.shape
    heads = attention.config.num_attention_heads
    q = attention.q_proj(hidden).view(batch, n, heads, attention.head_dim).transpose(1, 2)
    return cast(torch.Tensor, q * cos + _rotate_half(q) * sin)


def _llama_prompt_kv(attention: Any, prompt: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention.k_proj(prompt), attention.v_proj(prompt)


def _gpt2_queries(attention: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    q = attention.c_attn(hidden).split(attention.split_size, dim=2)[0]
    return cast(torch.Tensor, q.view(*q.shape[:-1], -1, attention.head_dim).transpose(1, 2))


def _gpt2_prompt_kv(attention: Any, prompt: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, key, value = attention.c_attn(prompt).split(width, dim=2)
    return key, value


class AdaptionPromptLayer(AdapterLayer):
    """An attention module (Llama/Mistral ``self_attn`` or GPT-2 ``attn``) plus gated adaption prompts.

    Raises:
        UnsupportedLayerError: ``base_layer`` is not such an attention module.
    """

    adapter_containers = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        if not _is_attention(base_layer):
            raise UnsupportedLayerError(
                "adaption prompts wrap a Llama/Mistral attention (q_proj, k_proj, v_proj, o_proj) or GPT-2's "
                f"(c_attn), not {type(base_layer).__name__}"
            )
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        gpt2 = _is_gpt2(base_layer)
        self._queries = _gpt2_queries if gpt2 else _llama_queries
        self._prompt_kv = _gpt2_prompt_kv if gpt2 else _llama_prompt_kv
        self._out = None if gpt2 else "o_proj"

    def add(self, name: str, adapter_len: int) -> None:
        """Add adapter ``name``: a standard-normal prompt of ``adapter_len`` tokens and a zero gate.

        They take the dtype of the query projection (``c_proj`` on GPT-2), fp32 over an integer (quantized) weight,
        and the module's device, as in HF PEFT; the prompt is drawn from torch's global generator.
        """
        attention = cast(Any, self.base_layer)
        weight = (attention.c_proj if _is_gpt2(attention) else attention.q_proj).weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = next(attention.parameters()).device
        hidden = attention.config.hidden_size
        self.adaption_prompt[name] = nn.Parameter(torch.empty(1, adapter_len, hidden, device=device,
                                                              dtype=dtype).normal_())
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def _term(self, name: str, queries: torch.Tensor, width: int) -> torch.Tensor:
        """The gated prompt attention of adapter ``name``, (batch, n, heads·d_head), before the output projection."""
        attention = cast(Any, self.base_layer)
        prompt, gate = self.adaption_prompt[name], self.adaption_gate[name]
        batch, heads, n, head_dim = queries.shape
        key, value = self._prompt_kv(attention, prompt, width)
        length = prompt.shape[1]

        def per_head(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, L, d_head); key/value heads repeated
            t = t.view(1, length, -1, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
            return torch.repeat_interleave(t, heads // t.shape[1], dim=1)

        dtype = queries.dtype
        scores = torch.matmul(queries, per_head(key).transpose(2, 3).to(dtype)) / math.sqrt(head_dim)
        # HF PEFT's order of operations: a softmax in fp32, back to the queries' dtype, then the gate.
        weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        return torch.matmul(weights, per_head(value)).transpose(1, 2).reshape(batch, n, -1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.base_layer(*args, **kwargs)
        names = self._applied()
        if not names:
            return outputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        output, rest = outputs[0], tuple(outputs[1:])
        queries = self._queries(self.base_layer, hidden, kwargs)
        for name in names:
            term = self._term(name, queries, output.shape[2])
            if self._out is not None:
                term = getattr(self.base_layer, self._out)(term)
            output = output + term
        return (output.to(queries.dtype), *rest)

    def describe(self, qualname: str) -> tuple[str, str, tuple[int, ...]]:
        return qualname, type(self.base_layer).__name__, ()

    def check_merge(self, names: Sequence[str], where: str = "") -> None:
        raise MergeError(
            f"adaption prompts {list(names)} at {where or 'this layer'} cannot be merged: they add attention over "
            "learned tokens rather than change a weight (HF PEFT cannot merge them either). Keep them as adapters, "
            "or pk.unload(model, merge=False) to drop them."
        )

    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        self.check_merge(names, where)


def _positive_int(field_name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field_name}={value!r} must be a positive integer ({hint})")


@register_method
@dataclass
class AdaptionPrompt(AdapterConfig):
    """LLaMA-Adapter's gated adaption prompts (HF PEFT's ``ADAPTION_PROMPT``).

    Attributes:
        adapter_len: L, the number of prompt tokens per layer (the paper uses 10).
        adapter_layers: how many attention layers, counted from the top, get a prompt (the paper: 30 of 32).
        target_modules: the name of the attention modules (one name; default per architecture: ``self_attn`` on
            Llama and Mistral, ``attn`` on GPT-2).
    """

    peft_type = "ADAPTION_PROMPT"
    adds_heads = False  # HF PEFT's config has no modules_to_save: a classifier's head is not trained

    adapter_len: int = 0
    adapter_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("adapter_len", self.adapter_len, "the prompt length per layer, e.g. 10")
        _positive_int("adapter_layers", self.adapter_layers, "how many top attention layers get a prompt")
        targets = list(self.target_modules)
        if len(targets) > 1 or any(set(t) & set("*?[]") for t in targets):
            raise ConfigError(f"target_modules={targets!r}: adaption prompts take one attention module name, such as "
                              "'self_attn' (the top adapter_layers modules of that name are adapted)")
        if self.exclude_modules or self.layers is not None:
            raise ConfigError("adaption prompts choose their layers by adapter_layers (the top ones); exclude_modules "
                              "and layers are not supported")
        if self.modules_to_save:
            raise ConfigError("adaption prompts have no modules_to_save (HF PEFT's config has no such field)")

    def for_model(self, model: nn.Module) -> AdapterConfig:
        """A copy naming the architecture's attention modules when ``target_modules`` is empty.

        Raises:
            ConfigError: the model's ``config.model_type`` is not one HF PEFT supports (llama, mistral, gpt2).
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ADAPTION_PROMPT_TARGETS:
            raise ConfigError(
                f"adaption prompts support model types {sorted(ADAPTION_PROMPT_TARGETS)} (those of HF PEFT 0.21.2), "
                f"not {model_type!r} ({type(model).__name__})"
            )
        return self if self.target_modules else self.replace(target_modules=[ADAPTION_PROMPT_TARGETS[model_type]])

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, AdaptionPromptLayer) or (not isinstance(module, AdapterLayer)
                                                           and _is_attention(module))

    def supported_layer_names(self) -> list[str]:
        return ["LlamaAttention", "MistralAttention", "GPT2Attention"]

    def resolve(self, model: nn.Module) -> list[str]:
        """The last ``adapter_layers`` modules named ``target_modules``, in the model's order (HF PEFT's choice).

        Raises:
            TargetNotFoundError: no module has that name. ConfigError: fewer than ``adapter_layers`` do.
            UnsupportedLayerError: a chosen module is not an attention module this method wraps.
        """
        target = list(self.target_modules)[0]
        names = [n for n, _ in iter_modules(model) if n]
        found = [n for n in names if matches(n, target)]
        if not found:
            raise TargetNotFoundError(f"target_modules={target!r} matches no module of {type(model).__name__}; "
                                      f"close names: {near_misses(target, names)}")
        if len(found) < self.adapter_layers:
            raise ConfigError(f"adapter_layers={self.adapter_layers} is more than the {len(found)} {target!r} modules "
                              f"of {type(model).__name__}; use at most {len(found)}")
        chosen = found[-self.adapter_layers:]
        for name in chosen:
            if not self.supports(model.get_submodule(name)):
                raise UnsupportedLayerError(f"{name} is a {type(model.get_submodule(name)).__name__}; adaption prompts "
                                            f"wrap {', '.join(self.supported_layer_names())}")
            inner = [f"{name}.{n}" for n, m in model.get_submodule(name).named_modules()
                     if n and isinstance(m, AdapterLayer)]
            if inner:  # wrapped, their names and files would change under the other method's adapter
                raise UnsupportedLayerError(
                    f"{name} holds adapters of another method ({', '.join(inner)}); adaption prompts cannot wrap an "
                    "attention module with adapters inside it. Adapt other modules with that method (e.g. "
                    "exclude_modules=[...] or layers=[...] sparing the top attention layers), use fewer "
                    "adapter_layers, or delete that adapter first with pk.delete_adapter."
                )
        return chosen

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, AdaptionPromptLayer) else AdaptionPromptLayer(module)
        layer.add(adapter_name, self.adapter_len)
        return layer

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "target_modules": list(self.target_modules)[0],
            "adapter_len": self.adapter_len,
            "adapter_layers": self.adapter_layers,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "auto_mapping": None,
            **self.extra,
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> AdaptionPrompt:
        target = data.get("target_modules")
        return cls(
            adapter_len=data.get("adapter_len", 0),  # validated in __post_init__
            adapter_layers=data.get("adapter_layers", 0),
            target_modules=[target] if isinstance(target, str) else list(target or ()),
            task_type=data.get("task_type"),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type target_modules adapter_len adapter_layers inference_mode base_model_name_or_path revision "
    "auto_mapping".split()
)
