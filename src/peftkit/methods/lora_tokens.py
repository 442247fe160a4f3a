"""LoRA's ``trainable_token_indices``: a trainable-tokens adapter beside a LoRA adapter, under the same name.

As in Hugging Face PEFT: a list of token ids trains those rows of the input embedding, a mapping
``{module name: token ids}`` those of each named embedding; an output layer tied to the input embedding
follows the trained rows. The rows are saved in the LoRA adapter's file under
``<embedding path>.token_adapter.trainable_tokens_delta`` (and not a second time for the tied layer), as
HF PEFT writes them. The rows themselves behave as :mod:`peftkit.methods.trainable_tokens` describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import nn

from peftkit.core.matching import first_match
from peftkit.core.state import get_state
from peftkit.core.walk import set_module
from peftkit.errors import ConfigError
from peftkit.methods.trainable_tokens import (
    TrainableTokens,
    TrainableTokensLayer,
    checked_indices,
    input_embedding_name,
    tie_output_layers,
    tied_modules,
)


def checked_token_spec(value: Any) -> list[int] | dict[str, list[int]] | None:
    """LoRA's ``trainable_token_indices``: ``None``, token ids (for the input embedding), or module → ids.

    Raises:
        ConfigError: an empty mapping or an invalid list of ids (named with its module).
    """
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ConfigError("trainable_token_indices={} names no embedding; use None, a list of token ids, "
                              "or {module name: token ids}")
        return {str(k): checked_indices(f"trainable_token_indices[{k!r}]", v) for k, v in value.items()}
    return checked_indices("trainable_token_indices", value)


class _HasTokenSpec(Protocol):
    trainable_token_indices: list[int] | dict[str, list[int]] | None
    modules_to_save: str | Sequence[str]


def lora_token_targets(model: nn.Module, config: _HasTokenSpec, lora_targets: Sequence[str]) -> dict[str, list[int]]:
    """The embeddings ``config.trainable_token_indices`` selects on ``model`` → their token ids, validated.

    As in HF PEFT, a list of ids is for the input embedding (``embed_tokens`` if the model cannot say which).

    Raises:
        ConfigError: an embedding that is also a LoRA target or in ``modules_to_save``, a tied output layer that
            is a LoRA target, or any error of :class:`TrainableTokens` (ids out of range, not an embedding, ...).
    """
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    entries = spec if isinstance(spec, dict) else {input_embedding_name(model) or "embed_tokens": spec}
    found: dict[str, list[int]] = {}
    for pattern, ids in entries.items():
        for target in TrainableTokens(token_indices=ids, target_modules=[pattern]).resolve(model):
            found[target] = list(ids)
    embedding = input_embedding_name(model)
    tied = [n for n, _ in tied_modules(model, model.get_submodule(embedding))] if embedding in found else []
    saved = list(config.modules_to_save)
    for name in [*found, *tied]:
        if name in lora_targets or first_match(name, saved) is not None:
            where = "a LoRA target" if name in lora_targets else "in modules_to_save"
            raise ConfigError(
                f"{name} is {where} and {'tied to ' if name in tied else ''}an embedding in trainable_token_indices; "
                "a module is adapted, trained in full or given trainable tokens, so leave it out of one of them"
            )
    return found


def add_lora_tokens(model: nn.Module, name: str, config: _HasTokenSpec) -> None:
    """Add LoRA adapter ``name``'s trainable tokens (saved under HF PEFT's ``token_adapter.`` keys)."""
    embedding = input_embedding_name(model)
    for qualname, ids in lora_token_targets(model, config, get_state(model).targets[name]).items():
        module = model.get_submodule(qualname)
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add(name, ids)
        layer.file_keys[name] = "token_adapter.trainable_tokens_delta"
        layer.set_active(get_state(model).active)
        set_module(model, qualname, layer)
        if qualname == embedding:
            tie_output_layers(model, name, layer, file_key=None)  # HF PEFT saves the rows once, here
