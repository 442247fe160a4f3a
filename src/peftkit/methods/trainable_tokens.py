"""Trainable tokens: train selected rows of an embedding table, not the whole table.

Hugging Face PEFT's ``TRAINABLE_TOKENS`` method, e.g. for new special tokens of a chat template. For a frozen
embedding table E (vocabulary × dim), token indices I = (i₁, …, iₖ) and a trained (k × dim) matrix D,
initialised to E[I] so that the adapter starts as a no-op::

    E' = E with rows I replaced by D          (E'[iⱼ] = Dⱼ, every other row is E's)
    x ↦ embedding(x; E')

Only D receives gradients and only D is saved, under ``<path>.trainable_tokens_delta``. Several adapters
replace their own rows; active adapters must use disjoint indices. Merging writes D into E's rows, and
unmerging writes the original rows (kept at creation) back, so both are exact.

Tied output layer: when another module shares the input embedding's weight (``tie_word_embeddings``, as in
GPT-2 and small Llamas), it is wrapped too and uses the very same D, so the logits of tokens I follow the
trained rows: ``x ↦ x E'ᵀ``. HF PEFT does the same and saves D a second time under the tied module's path;
so does peftkit, so files cross-load both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import register_method
from peftkit.core.state import get_state
from peftkit.core.walk import iter_modules, set_module
from peftkit.errors import AdapterStateError, ConfigError
from peftkit.io.hf_names import hf_modules_to_save, hf_resolve, hf_targets
from peftkit.methods.lora_layers import adapter_dtype


def _original_key(name: str) -> str:
    return f"trainable_tokens_original_{name}"


class TrainableTokensLayer(AdapterLayer):
    """A module whose weight rows ``token_indices[name]`` are replaced by adapter ``name``'s trained rows.

    The base layer is an ``nn.Embedding`` (any subclass: its own ``forward`` runs on the updated table) or,
    for a tied output layer, the linear layer sharing that embedding's weight.
    """

    adapter_containers = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        #: adapter name → the rows it replaces.
        self.token_indices: dict[str, list[int]] = {}
        #: adapter name → its key in the adapter file, where it is not ``trainable_tokens_delta``: HF PEFT keys
        #: LoRA's trainable tokens ``token_adapter.trainable_tokens_delta``, and saves none for their tied layer.
        self.file_keys: dict[str, str | None] = {}

    @property
    def table(self) -> torch.Tensor:
        """The base layer's weight, one row per token."""
        return cast(torch.Tensor, self.base_layer.weight)

    def add(self, name: str, indices: Sequence[int], init_weights: bool = True) -> None:
        """A new adapter over rows ``indices``, initialised to those rows (or randomly without ``init_weights``)."""
        original = self.table.detach()[list(indices)].clone()
        dtype = adapter_dtype(original)
        if init_weights:
            values = original.to(dtype, copy=True)  # its own storage: training must not move the originals
        else:
            values = torch.randn(original.shape, dtype=dtype, device=original.device)
        self._register(name, indices, nn.Parameter(values), original)

    def add_tied(self, name: str, source: TrainableTokensLayer) -> None:
        """Adapter ``name`` of ``source`` on this layer too: the same parameter, not a copy."""
        self._register(name, source.token_indices[name], source.trainable_tokens_delta[name], source.original(name))

    def _register(self, name: str, indices: Sequence[int], delta: nn.Parameter, original: torch.Tensor) -> None:
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = delta
        # The rows before training, for an exact unmerge; not part of the adapter's files.
        self.register_buffer(_original_key(name), original, persistent=False)

    def original(self, name: str) -> torch.Tensor:
        """The rows adapter ``name`` replaces, as they were when it was added."""
        return self.get_buffer(_original_key(name))

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        key = self.file_keys.get(name, "trainable_tokens_delta")
        return {key: self.trainable_tokens_delta[name]} if key and name in self.trainable_tokens_delta else {}

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.token_indices.pop(name, None)
        self.file_keys.pop(name, None)
        self._buffers.pop(_original_key(name), None)

    def _index(self, name: str) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], dtype=torch.long, device=self.table.device)

    def _check_disjoint(self, names: Sequence[str]) -> None:
        seen: dict[int, str] = {}
        for name in names:
            for index in self.token_indices[name]:
                if index in seen and seen[index] != name:
                    raise AdapterStateError(
                        f"trainable-token adapters {seen[index]!r} and {name!r} both replace token {index}; "
                        "adapters used together (active or merged) need disjoint token_indices. Activate one "
                        "of them with pk.set_adapter."
                    )
                seen[index] = name

    def check_active(self, names: Sequence[str], where: str = "") -> None:
        self._check_disjoint([*names, *self.merged_adapters])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = self._applied()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_disjoint(names + self.merged_adapters)
        base = self.base_layer
        if not args and not kwargs:
            if type(base) is nn.Embedding and self._plain_lookup(names):
                return self._replace_rows(x, names)
            if type(base) is nn.Linear:
                return self._replace_columns(x, names)
        return self._on_updated_table(x, names, *args, **kwargs)

    def _plain_lookup(self, names: Sequence[str]) -> bool:
        """Whether the embedding is a plain row lookup for these adapters' rows (no renormalisation, sparse or
        frequency-scaled gradients, and no trained row that is the padding row, whose gradient is zeroed)."""
        base = cast(nn.Embedding, self.base_layer)
        return (base.max_norm is None and not base.sparse and not base.scale_grad_by_freq
                and not any(base.padding_idx in self.token_indices[n] for n in names))

    def _replace_rows(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The frozen lookup with the trained rows put in where ``x`` names their tokens: nothing as large as
        the table is copied (HF PEFT copies the whole table in every forward)."""
        out = cast(torch.Tensor, self.base_layer(x))
        for name in names:
            slot = torch.full((self.table.shape[0],), -1, dtype=torch.long, device=x.device)
            slot[self._index(name)] = torch.arange(len(self.token_indices[name]), device=x.device)
            row = slot[x]  # which trained row each token takes, -1: none
            delta = self.trainable_tokens_delta[name].to(out.dtype)
            out = torch.where((row >= 0).unsqueeze(-1), nn.functional.embedding(row.clamp(min=0), delta), out)
        return out

    def _replace_columns(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """A tied output layer's logits with the trained rows' columns computed from them (``x Dᵀ``)."""
        out = cast(torch.Tensor, self.base_layer(x))
        bias = cast(torch.Tensor | None, self.base_layer.bias)
        for name in names:
            index = self._index(name)
            delta = self.trainable_tokens_delta[name].to(x.dtype)
            out.index_copy_(out.dim() - 1, index, nn.functional.linear(x, delta, None if bias is None else bias[index]))
        return out

    def _on_updated_table(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """Any other base layer: its own forward on a copy of the table with the trained rows in place."""
        weight = self.table
        for name in names:  # out of place: gradients reach the trained rows only
            weight = weight.index_copy(0, self._index(name), self.trainable_tokens_delta[name].to(weight.dtype))
        # The base layer's own forward on the updated table keeps its options (padding_idx, a scaled embedding's
        # factor, a linear layer's bias).
        return functional_call(self.base_layer, {"weight": weight}, (x, *args), kwargs, strict=False)

    # -- merging: rows written into the weight, and the original rows written back -------------------
    def merge(self, names: Sequence[str], safe: bool = False, where: str = "") -> None:
        todo = [n for n in names if n not in self.merged_adapters and self.has_adapter(n)]
        self._check_disjoint(self.merged_adapters + todo)
        if safe:
            for name in todo:
                self.check_finite(self.trainable_tokens_delta[name].detach(), where or "embedding", name)
        with torch.no_grad():
            for name in todo:
                self.table.index_copy_(0, self._index(name), self.trainable_tokens_delta[name].to(self.table.dtype))
        self.merged_adapters.extend(todo)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        with torch.no_grad():
            for name in [n for n in reversed(self.merged_adapters) if names is None or n in names]:
                self.table.index_copy_(0, self._index(name), self.original(name).to(self.table.dtype))
                self.merged_adapters.remove(name)


def checked_indices(field: str, value: Any) -> list[int]:
    """``value`` as a list of distinct token ids.

    Raises:
        ConfigError: ``value`` is empty, repeats an id, or holds something other than integers ≥ 0.
    """
    indices = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if not indices or bad:
        raise ConfigError(
            f"{field}={value!r} must be a non-empty list of token ids (integers ≥ 0)"
            f"{f'; not token ids: {bad}' if bad else ''}, e.g. the input_ids of your new special tokens"
        )
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ConfigError(f"{field} lists {repeated} more than once; give each token id once")
    return indices


def input_embedding_name(model: nn.Module) -> str | None:
    """The qualified name of ``model.get_input_embeddings()`` (or of the adapter layer wrapping it), or ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        embedding = get()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in iter_modules(model) if n and m is embedding), None)


def tied_modules(model: nn.Module, embedding: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules other than ``embedding`` (a plain embedding or its adapter layer) that use its very weight.

    Raises:
        ConfigError: such a module is already adapted by another method.
    """
    base = embedding.base_layer if isinstance(embedding, AdapterLayer) else embedding
    weight = base.weight
    found: list[tuple[str, nn.Module]] = []
    for name, module in iter_modules(model):
        if module is embedding or module is base:
            continue
        inner = module.base_layer if isinstance(module, AdapterLayer) else module
        if inner._parameters.get("weight") is not weight:
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer):
            raise ConfigError(
                f"{name} shares its weight with the input embedding (tied word embeddings) and is already adapted "
                f"by a {type(module).__name__}; trainable tokens must update it too. Remove that adapter first, "
                "or untie the output layer."
            )
        found.append((name, module))
    return found


def tie_output_layers(
    model: nn.Module, name: str, source: TrainableTokensLayer, file_key: str | None = "trainable_tokens_delta"
) -> None:
    """Give the modules tied to the input embedding ``source`` its adapter ``name`` (the same parameter).

    ``file_key``: the tied layer's key for it in the adapter file (``None``: not saved there).
    """
    for qualname, module in tied_modules(model, source):
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add_tied(name, source)
        layer.file_keys[name] = file_key
        layer.set_active(get_state(model).active)
        set_module(model, qualname, layer)


@register_method
@dataclass
class TrainableTokens(AdapterConfig):
    """Train the embedding rows of ``token_indices`` only (HF PEFT's ``TrainableTokensConfig``).

    Attributes:
        token_indices: the token ids whose rows train; distinct, each in ``[0, vocabulary size)``.
        target_modules: the embedding layers to adapt; ``None``: the model's input embedding
            (``get_input_embeddings()``), whose tied output layer, if any, follows the trained rows.
        init_weights: start from the current rows (a no-op until trained); ``False`` draws them from N(0, 1).
    """

    peft_type = "TRAINABLE_TOKENS"
    adds_heads = False  # HF PEFT trains no classifier head with trainable tokens

    token_indices: Sequence[int] = ()
    # ``None`` (HF PEFT's spelling of "the input embedding") is stored as the empty list by __post_init__.
    target_modules: str | Sequence[str] | None = field(default=None, kw_only=True)  # type: ignore[assignment]
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_indices = checked_indices("token_indices", self.token_indices)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} must be True or False")

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, AdapterLayer):  # a second adapter (resolve refuses a tied output layer)
            return isinstance(module, TrainableTokensLayer)
        return isinstance(module, nn.Embedding) or type(module) is nn.Linear  # an output layer: rows are tokens

    def supported_layer_names(self) -> list[str]:
        return ["Embedding", "Linear"]

    def resolve(self, model: nn.Module) -> list[str]:
        if self.target_modules:
            targets = super().resolve(model)
        else:
            name = input_embedding_name(model)
            if name is None:
                raise ConfigError(
                    f"{type(model).__name__} has no get_input_embeddings(); name the embedding layer to adapt, "
                    "e.g. pk.TrainableTokens(token_indices=[...], target_modules=['embed_tokens'])"
                )
            targets = [name]
            if not self.supports(model.get_submodule(name)):
                raise ConfigError(f"the input embedding {name} is a {type(model.get_submodule(name)).__name__}, "
                                  "not an nn.Embedding; name an embedding layer in target_modules")
        for target in targets:
            module = model.get_submodule(target)
            rows = int(cast(torch.Tensor, module.weight).shape[0])
            outside = [i for i in self.token_indices if i >= rows]
            if outside:
                raise ConfigError(
                    f"token_indices {outside} are out of range for {target}, which has {rows} tokens (ids 0 to "
                    f"{rows - 1}); add new tokens to the vocabulary first (model.resize_token_embeddings)"
                )
            embedding = input_embedding_name(model)
            if target == embedding:
                tied_modules(model, module)  # refuses an output layer another method holds, before any change
            elif embedding is not None and any(n == target for n, _ in tied_modules(model, model.get_submodule(
                    embedding))):
                raise ConfigError(
                    f"{target} shares its weight with the input embedding {embedding} (tied word embeddings); "
                    f"target {embedding!r} instead: its tied output layer takes the same trained rows"
                )
        return targets

    def transform(self, module: nn.Module, qualname: str, adapter_name: str) -> nn.Module:
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add(adapter_name, self.token_indices, self.init_weights)
        return layer

    def after_apply(self, model: nn.Module, name: str) -> None:
        """Put the input embedding's adapter on the output layer tied to it, as HF PEFT does."""
        embedding = input_embedding_name(model)
        state = get_state(model)
        if embedding is None or embedding not in state.targets[name]:
            return
        tie_output_layers(model, name, cast(TrainableTokensLayer, model.get_submodule(embedding)))

    # -- adapter_config.json ---------------------------------------------------------------------
    def to_hf_dict(self, targets: list[str], module_names: list[str]) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "token_indices": list(self.token_indices),
            # HF PEFT writes the input embedding's name when target_modules was not given.
            "target_modules": hf_targets(targets, module_names) if self.target_modules else targets[0],
            "init_weights": self.init_weights,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            **({"modules_to_save": list(self.modules_to_save)} if self.modules_to_save else {}),
            **{k: v for k, v in self.extra.items() if k not in _HF_FIELDS},
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], module_names: list[str]) -> TrainableTokens:
        spec = data.get("target_modules")
        return cls(
            token_indices=list(data.get("token_indices") or []),
            target_modules=hf_resolve(spec, module_names) if spec else None,
            init_weights=bool(data.get("init_weights", True)),
            modules_to_save=hf_modules_to_save(data.get("modules_to_save"), module_names),
            task_type=data.get("task_type"),
            extra={k: v for k, v in data.items() if k not in _HF_FIELDS},
        )


_HF_FIELDS = frozenset(
    "peft_type task_type token_indices target_modules init_weights inference_mode modules_to_save".split()
)

