"""Prefix tuning: learned key/value prefixes in every attention layer.

Paper: Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021
(https://arxiv.org/abs/2101.00190).

Each layer ℓ attends over m learned positions before the real ones::

    Attn(Q, [P_Kℓ ; K], [P_Vℓ ; V]),       [P_K1, P_V1, …, P_KL, P_VL] = reshape(T)

with T ∈ ℝ^{m × 2·L·d_kv} a table (``prefix_projection=False``) or, reparametrised as in the paper,
T = W₂ tanh(W₁ E + b₁) + b₂ with E ∈ ℝ^{m×d} (``prefix_projection=True``). d_kv is the key/value width
(heads × head size; the key/value heads under grouped-query attention).

The prefix enters through the model's KV cache (``transformers``' ``DynamicCache``, and the decoder's
self-attention cache of an ``EncoderDecoderCache`` for T5): the shared pre-hook of
:mod:`peftkit.methods.prompt` fills an empty cache with the prefix, extends the attention mask by m
ones and shifts given position ids by m, so ``generate()`` works unchanged. Sequence classifiers whose
head does not take a cache (BERT) get the prefix through their backbone. As in Hugging Face PEFT 0.21
(``PREFIX_TUNING``), the file holds T itself under ``prompt_embeddings``, so an adapter trained with
the projection loads as a plain table.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.registry import register_method
from peftkit.errors import ConfigError
from peftkit.io.hf_names import hf_modules_to_save
from peftkit.methods.prompt import (
    ATTR,
    PromptLearningConfig,
    attach,
    cache_key,
    cache_length,
    check_virtual_tokens,
    extend_mask,
    hf_prompt_dict,
    is_seq2seq,
    model_dims,
)


def check_no_checkpointing(model: nn.Module) -> None:
    """Refuse activation checkpointing, under which the prefix would be lost.

    ``transformers``' checkpointed layers drop the KV cache in training (a cache updated again when the
    backward pass replays the layer would be wrong), and the cache is what carries the prefix. HF PEFT
    refuses it too.

    Raises:
        ConfigError: a submodule of ``model`` has ``gradient_checkpointing`` on.
    """
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ConfigError(
            f"prefix tuning cannot train {type(model).__name__} with gradient checkpointing: its checkpointed layers "
            "drop the KV cache that carries the prefix. Call model.gradient_checkpointing_disable() (or set "
            "model.gradient_checkpointing: false), or use pk.PromptTuning / pk.PTuning, which work with it."
        )


def kv_dims(model: nn.Module) -> tuple[int, int]:
    """(d_kv, key/value heads): the width of one layer's keys (values) and their heads, grouped-query attention
    included.

    As HF PEFT provisions them, except where the model's head width is not its hidden size over its heads (T5's
    ``d_kv``: flan-t5-small has 6 heads of 64 on a hidden size of 512), which HF PEFT's prefix tuning cannot run
    (``shape … is invalid``, huggingface/peft#385). The width is then heads × head width, written to the adapter's
    config as ``token_dim``, from which HF PEFT runs it too.
    """
    dims = model_dims(model)
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or dims["num_heads"]
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or dims["token_dim"] // dims["num_heads"]
    return head_dim * heads, heads


class PrefixEncoder(nn.Module):
    """The prefix of one adapter: a table, or an embedding and a two-layer MLP (``transform``)."""

    def __init__(self, m: int, token_dim: int, num_layers: int, num_heads: int, hidden: int, projection: bool,
                 submodules: int) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.num_heads = m, num_layers, num_heads
        self.token_dim, self.submodules = token_dim, submodules
        width = num_layers * 2 * token_dim
        self.embedding = nn.Embedding(m, token_dim if projection else width)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)) \
            if projection else None

    def saved_table(self) -> torch.Tensor:
        """T, (m, 2·L·d_kv): what the file holds."""
        weight = self.embedding.weight
        return self.transform(weight) if self.transform is not None else weight

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V), each (batch, heads, m, head size), laid out exactly as HF PEFT's ``get_prompt``."""
        m, heads = self.num_virtual_tokens, self.num_heads
        table = self.saved_table().to(dtype).unsqueeze(0).expand(batch, -1, -1)
        kv = table.reshape(batch, m, self.num_layers * 2, heads, self.token_dim // heads)
        if self.submodules == 2:  # encoder-decoder: HF PEFT doubles the list, then takes 4 entries per layer
            kv = torch.cat([kv, kv], dim=2)
        chunks = torch.split(kv.permute(2, 0, 3, 1, 4), self.submodules * 2)
        return [(c[0], c[1]) for c in chunks]

    def fill(self, cache: Any, batch: int, dtype: torch.dtype) -> None:
        for layer, (k, v) in enumerate(self.key_values(batch, dtype)):
            cache.update(k, v, layer)

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Give the call a cache holding the prefix, and masks/positions that count it."""
        from transformers import DynamicCache, EncoderDecoderCache

        key = cache_key(model)
        if key not in inspect.signature(model.forward).parameters and "past_key_values" not in \
                inspect.signature(model.forward).parameters:
            return  # a classifier head without a cache argument: the backbone hook does it
        if model.training and torch.is_grad_enabled():  # when transformers drops the cache (evaluation keeps it)
            check_no_checkpointing(model)
        m = self.num_virtual_tokens
        cache = kwargs.pop("past_key_values", None) if key != "past_key_values" else None
        cache = kwargs.get(key) if kwargs.get(key) is not None else cache
        ref = next(kwargs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds",
                                        "labels") if kwargs.get(k) is not None)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if is_seq2seq(model):
            if cache is None:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            if cache_length(cache) == 0:
                self.fill(cache.self_attention_cache, ref.shape[0], dtype)
            kwargs["decoder_attention_mask"] = extend_mask(kwargs.get("decoder_attention_mask"), m)
        else:
            if cache is None:
                cache = DynamicCache()
            if cache_length(cache) == 0:
                self.fill(cache, ref.shape[0], dtype)
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), m)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + m
        kwargs[key] = cache

    def prepare_backbone(self, backbone: nn.Module, kwargs: dict[str, Any]) -> None:
        self.prepare(backbone, kwargs)


@register_method
@dataclass
class PrefixTuning(PromptLearningConfig):
    """Learned key/value prefixes.

    Attributes:
        num_virtual_tokens: m, the prefix length.
        prefix_projection: reparametrise the prefix through a two-layer MLP while training.
        encoder_hidden_size: the MLP's hidden width (default: the model's hidden size).
    """

    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self.num_virtual_tokens)
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ConfigError(f"encoder_hidden_size={self.encoder_hidden_size!r} must be a positive integer")

    def dims(self, model: nn.Module) -> dict[str, int]:
        """The sizes HF PEFT writes to ``adapter_config.json`` for this model."""
        token_dim, heads = kv_dims(model)
        return {"token_dim": token_dim, "num_attention_heads": heads, "num_layers": model_dims(model)["num_layers"],
                "num_transformer_submodules": 2 if is_seq2seq(model) else 1,
                "encoder_hidden_size": self.encoder_hidden_size or token_dim}

    def inject(self, model: nn.Module, name: str) -> list[str]:
        check_no_checkpointing(model)
        d = self.dims(model)
        attach(model, name, PrefixEncoder(self.num_virtual_tokens, d["token_dim"], d["num_layers"],
                                          d["num_attention_heads"], d["encoder_hidden_size"],
                                          self.prefix_projection, d["num_transformer_submodules"]))
        self.extra = {**self.extra, **d}  # written to adapter_config.json
        return [ATTR]

    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        own = {"prefix_projection": self.prefix_projection, "init_weights": None}
        return hf_prompt_dict(self, self.num_virtual_tokens, own, ("peft_type", "prefix_projection", "modules_to_save"))

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> PrefixTuning:
        # The file holds the projected table T, so a projection-trained adapter loads as a plain table.
        keep: dict[str, Any] = {k: data[k] for k in ("num_layers", "token_dim", "num_attention_heads") if k in data}
        return cls(num_virtual_tokens=int(data["num_virtual_tokens"]), prefix_projection=False,
                   task_type=data.get("task_type"), extra=keep,
                   modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names))
