"""Mixed adapter batches: each row of a batch through its own LoRA adapter (HF PEFT's ``adapter_names=``).

For a batch whose row i is assigned adapter aᵢ (``"__base__"``: none), every LoRA layer computes::

    yᵢ = W₀xᵢ + s_a·B_a A_a xᵢ,     a = aᵢ        (yᵢ = W₀xᵢ for "__base__")

so several adapters are served from one batch, with one base matmul for all rows. As in HF PEFT: inference only,
LoRA and RoAd adapters only (no DoRA, activated LoRA or ``modules_to_save``), nothing merged. A RoAd layer turns its
adapters' rows of the base output itself (:mod:`peftkit.methods.road`); any layer with ``mixes_rows`` takes part.

How it is wired, without a wrapper model: :func:`mixed_batch` hands each LoRA layer of the model one shared
:class:`Routing` (kept in the layer's ``__dict__``, outside the module state, for the block's duration); a layer
that has one takes :func:`forward` instead of its usual paths, so the fused and grouped kernels are untouched and a
layer outside a mixed batch pays one attribute read. The routing holds, per batch size and device, each adapter's
row indices, computed once and shared by every layer and every call of the block; a layer runs one
``index_select`` and one ``index_add`` per adapter in the batch, never a loop over rows. Layers of other methods
run their base layer only for the block's duration. A forward pre-hook on the model reads the batch size of each
call: ``generate(num_beams=k)`` (or ``num_return_sequences=k``) repeats each prompt k times in a row, so a batch k
times as long as the list gives each name to its k consecutive rows, which is what HF PEFT does for beam search.

There is no ``adapter_names=`` keyword on the model's forward: without a wrapper model, taking it would need a hook
on every adapted model for good (a cost on every call, and a change to what its ``forward`` accepts), where the block
needs one only while it lasts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftkit.core.registry import DEQUANTIZERS
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError, UnsupportedLayerError

__all__ = ["BASE", "Routing", "check_layer", "forward", "mixed_batch"]

#: The name of "no adapter" in a mixed batch (HF PEFT's).
BASE = "__base__"


class Routing:
    """Which rows of a batch go through which adapter, for one :func:`mixed_batch` block.

    Attributes:
        names: the adapter of each row (or of each group of rows, see :meth:`groups`).
        calls: the batch size of the model call in progress, when the model's pre-hook could read it.
    """

    def __init__(self, names: tuple[str, ...], where: dict[int, str]) -> None:
        self.names = names
        self.calls: int | None = None
        self._where = where  # id(layer) → its qualified name, for messages
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def batch_of(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Check and record the batch size of a model call (its token ids or embeddings, else its first tensor)."""
        if model.training:
            raise AdapterStateError("pk.mixed_batch is for inference (HF PEFT refuses adapter_names in training "
                                    "mode too); call model.eval() first")
        # The decoder's inputs count where there are no encoder inputs: generate() on an encoder-decoder model
        # runs the encoder on the prompts once, then only the decoder on the expanded batch.
        keys = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")
        found = next((kwargs[k] for k in keys if kwargs.get(k) is not None), None)
        if found is None:
            found = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not isinstance(found, torch.Tensor) or found.dim() == 0:
            self.calls = None
            return
        rows = found.shape[0]
        if rows % len(self.names):
            raise AdapterStateError(
                f"the model was called with a batch of {rows} rows, but pk.mixed_batch names {len(self.names)} "
                "adapters: give one name per row (a batch k times as long, as generate(num_beams=k) makes, gives "
                "each name to k consecutive rows)"
            )
        self.calls = rows

    def groups(self, layer: nn.Module, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """``(adapter, its row indices)`` for a layer input of ``rows`` rows, ``"__base__"`` left out.

        Raises:
            AdapterStateError: ``rows`` is neither the number of names nor the batch size of the model call.
        """
        key = (rows, device)
        found = self._groups.get(key)
        if found is not None:
            return found
        n = len(self.names)
        if rows != n and rows != self.calls:
            where = self._where.get(id(layer), type(layer).__name__)
            raise AdapterStateError(
                f"{where} got an input of {rows} rows in a mixed batch of {n} adapter names"
                f"{f' (model call: {self.calls} rows)' if self.calls not in (None, n) else ''}; the names must "
                "match the batch one per row, and the layer must see the batch's rows (not tokens flattened "
                "across rows)"
            )
        per = rows // n
        rows_of: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            if name != BASE:
                rows_of.setdefault(name, []).extend(range(i * per, (i + 1) * per))
        found = [(name, torch.tensor(idx, dtype=torch.long, device=device)) for name, idx in rows_of.items()]
        self._groups[key] = found
        return found


def forward(layer: Any, routing: Routing, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> torch.Tensor:
    """A LoRA layer's output with row ``i`` of ``x`` through its own adapter: ``base(x)``, plus each adapter's update
    (``layer.row_update``) on its rows. Rounded as ``LoRALinear.forward``: once, after the update (first on a
    quantized base)."""
    check_layer(layer, routing)
    result: torch.Tensor = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    quantized = DEQUANTIZERS.lookup(type(layer.base_layer)) is not None
    out = result
    for name, rows in routing.groups(layer, x.shape[0], x.device):
        if not layer.has_adapter(name):
            continue
        update: torch.Tensor = layer.row_update(name, x.index_select(0, rows))
        if quantized:
            update = update.to(dtype)
        elif update.dtype != out.dtype:
            out = out.to(torch.promote_types(out.dtype, update.dtype))
        out = out.index_add(0, rows, update.to(out.dtype))
    return out.to(dtype)


def check_layer(layer: Any, routing: Routing) -> None:
    """Refuse a mixed forward through ``layer`` once it is disabled or has merged adapters inside the block.

    Raises:
        AdapterStateError: naming the layer and its state.
    """
    if layer.disabled or layer.merged_adapters:
        where = routing._where.get(id(layer), type(layer).__name__)
        state = "disabled (pk.disable_adapters)" if layer.disabled else f"merged ({layer.merged_adapters})"
        raise AdapterStateError(f"adapters of {where} are {state} inside pk.mixed_batch; use '__base__' rows for "
                                "the base model, and pk.unmerge(model) before mixing adapters")


def _mixes(layer: nn.Module) -> bool:
    """Whether ``layer`` routes rows through their own adapters (``mixes_rows``: plain LoRA and RoAd layers)."""
    return bool(getattr(layer, "mixes_rows", False))


def _check(model: nn.Module, names: tuple[str, ...]) -> None:
    """Refuse a mixed batch the model cannot run, before anything changes."""
    from peftkit.methods.lora import LoRA

    state = get_state(model)
    unknown = sorted({n for n in names if n != BASE and n not in state.configs})
    if unknown:
        raise AdapterNotFoundError(f"pk.mixed_batch names no adapter {', '.join(map(repr, unknown))} on this model; "
                                   f"its adapters are {sorted(state.configs) or 'none'}, and '__base__' is the "
                                   "base model")
    if model.training:
        raise AdapterStateError("pk.mixed_batch is for inference (HF PEFT refuses adapter_names in training mode "
                                "too); call model.eval() first")
    wanted = set(names) - {BASE}
    for name in sorted(wanted):
        config = state.configs[name]
        if not (isinstance(config, LoRA) or getattr(config, "mixes_rows", False)) \
                or getattr(config, "alora_invocation_tokens", None):
            method = "activated LoRA" if isinstance(config, LoRA) else type(config).__name__
            raise UnsupportedLayerError(f"adapter {name!r} is an adapter of method {method}; pk.mixed_batch mixes "
                                        f"RoAd and plain LoRA adapters only (as HF PEFT): run the {method} adapter's "
                                        f"rows in a batch of their own after pk.set_adapter(model, {name!r})")
        if state.saved.get(name):
            raise UnsupportedLayerError(f"adapter {name!r} has modules_to_save ({', '.join(state.saved[name])}), "
                                        "which pk.mixed_batch cannot route per row")
    for qualname, layer in adapter_layers(model):
        if layer.merged_adapters:
            raise AdapterStateError(f"{qualname} has merged adapters {layer.merged_adapters}; pk.mixed_batch "
                                    "refuses merged adapters (as HF PEFT): call pk.unmerge(model) first")
        if layer.disabled:
            raise AdapterStateError(f"pk.mixed_batch inside pk.disable_adapters ({qualname} is disabled): use "
                                    "'__base__' rows for the base model instead")
        held = sorted(n for n in wanted if layer.has_adapter(n))
        for name in held:
            if not _mixes(layer):
                raise UnsupportedLayerError(f"adapter {name!r} is held at {qualname} by a {type(layer).__name__}, "
                                            "which cannot route rows; pk.mixed_batch mixes RoAd and plain LoRA "
                                            "adapters only")
            if name in getattr(layer, "lora_magnitude_vector", {}):
                raise UnsupportedLayerError(f"adapter {name!r} is a DoRA adapter ({qualname}); pk.mixed_batch mixes "
                                            "plain LoRA adapters only (HF PEFT refuses DoRA here too)")


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of every batch ``model`` runs goes through adapter ``adapter_names[i]``.

    ``"__base__"`` is the base model (no adapter). The active adapters (``pk.set_adapter``) do not matter inside
    the block; adapters not named in it are off. A batch k times as long as ``adapter_names`` (``generate`` with
    ``num_beams=k`` or ``num_return_sequences=k``) gives each name to k consecutive rows.

    Args:
        model: a model with LoRA or RoAd adapters (``pk.apply``/``pk.load_adapter``), in eval mode.
        adapter_names: one adapter name (or ``"__base__"``) per row of the batch.

    Raises:
        AdapterNotFoundError: a name is not an adapter of ``model``.
        UnsupportedLayerError: a named adapter is neither a plain LoRA adapter (DoRA, activated LoRA) nor a RoAd
            adapter, or has ``modules_to_save``.
        AdapterStateError: the model is in training mode, has merged adapters, or is inside
            ``pk.disable_adapters``; nested in another ``pk.mixed_batch`` of the same model. At forward time: a
            batch whose size does not fit the names, or a layer disabled or merged inside the block.
        ConfigError: ``adapter_names`` is not a non-empty sequence of strings.
    """
    if isinstance(adapter_names, str) or not adapter_names or not all(isinstance(n, str) for n in adapter_names):
        raise ConfigError(f"adapter_names={adapter_names!r} must be a non-empty list of adapter names, one per row "
                          "of the batch ('__base__' for the base model)")
    names = tuple(adapter_names)
    _check(model, names)
    layers = list(adapter_layers(model))
    if any(layer.__dict__.get("_mixed") is not None for _, layer in layers):
        raise AdapterStateError("pk.mixed_batch is already active on this model; nested blocks are not supported")
    routing = Routing(names, {id(layer): q for q, layer in layers})
    mixing = [layer for _, layer in layers if _mixes(layer)]
    others = [layer for _, layer in layers if not _mixes(layer)]
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: routing.batch_of(m, args, kwargs),
                                             with_kwargs=True)
    for mixer in mixing:
        mixer.__dict__["_mixed"] = routing  # not module state: read by the layer's forward, dropped on exit
    for other in others:
        other.disabled = True  # (none was disabled: checked above)
    try:
        yield
    finally:
        handle.remove()
        for mixer in mixing:
            mixer.__dict__.pop("_mixed", None)
        for other in others:
            other.disabled = False
