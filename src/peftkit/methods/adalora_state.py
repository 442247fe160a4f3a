"""AdaLoRA's rank-allocator state in training checkpoints: saved, checked against the model, restored.

Without it a resumed run would re-allocate ranks from empty importance EMAs. A state (one per adapter) holds the
EMA tensors ``ema_ipt.<key>`` / ``ema_unc.<key>`` (``<key>`` = ``<layer qualname>.<lora_A|lora_B|lora_E>``) and
JSON-able entries that let a resume check the model before anything changes (see :func:`allocator_state_dict`).
:mod:`peftkit.train.checkpoint` writes them as ``adalora.safetensors`` + ``adalora.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core.state import get_state
from peftkit.errors import CheckpointError, ShapeMismatchError

if TYPE_CHECKING:
    from peftkit.methods.adalora import RankAllocator

#: Where :func:`peftkit.methods.adalora.adalora_step` keeps a model's allocators (adapter name → allocator).
_ALLOCATORS = "_peftkit_adalora"
_META_KEYS = ("layers", "tensors", "rank_pattern", "rank_mask")
_RESUME_FIX = "resume with the model and peft config the checkpoint was trained with, or set checkpoint.resume=none"


def allocator_state_dict(allocator: RankAllocator) -> dict[str, Any]:
    """Everything ``allocator`` carries between steps, for a training checkpoint.

    Returns:
        Tensors ``ema_ipt.<key>`` / ``ema_unc.<key>`` (``<key>`` as in :meth:`RankAllocator.factors`) and JSON-able
        entries: ``layers`` (qualname → rank, to check the model), ``tensors`` (the tensor keys, so a lost one is
        detected), ``rank_pattern`` (the config's) and ``rank_mask`` (each layer's kept triplets, which decide
        what is saved).
    """
    state: dict[str, Any] = {f"ema_ipt.{k}": v.detach() for k, v in allocator.ema_ipt.items()}
    state.update({f"ema_unc.{k}": v.detach() for k, v in allocator.ema_unc.items()})
    meta = {
        "layers": {q: layer.rank[allocator.name] for q, layer in allocator.layers.items()},
        "tensors": sorted(state),
        "rank_pattern": {q: list(mask) for q, mask in allocator.config.rank_pattern.items()},
        "rank_mask": {q: layer.rank_mask[allocator.name].tolist()
                      for q, layer in allocator.layers.items() if allocator.name in layer.rank_mask},
    }
    return {**state, **meta}


def load_allocator_state(allocator: RankAllocator, state: dict[str, Any]) -> None:
    """Restore :func:`allocator_state_dict` output into ``allocator``; checks it all before changing anything.

    Raises:
        CheckpointError: a missing or unexpected key, or layers/ranks that differ from the allocator's model.
        ShapeMismatchError: an EMA tensor whose shape differs from its parameter's.
    """
    check_allocator_state(allocator, state)
    params = dict(allocator.factors())
    emas = {"ema_ipt": allocator.ema_ipt, "ema_unc": allocator.ema_unc}
    for ema in emas.values():
        ema.clear()
    for key in state["tensors"]:
        which, _, factor = key.partition(".")
        emas[which][factor] = state[key].to(device=params[factor].device, copy=True)
    allocator.config.rank_pattern = {q: [bool(v) for v in mask] for q, mask in state["rank_pattern"].items()}
    for qualname, layer in allocator.layers.items():
        mask = state["rank_mask"].get(qualname)
        if mask is None:
            layer.rank_mask.pop(allocator.name, None)
        else:
            device = layer.lora_E[allocator.name].device
            layer.rank_mask[allocator.name] = torch.tensor(mask, dtype=torch.bool, device=device)


def check_allocator_state(allocator: RankAllocator, state: dict[str, Any]) -> None:
    """Check that ``state`` (a :meth:`RankAllocator.state_dict`) fits ``allocator``'s model; changes nothing.

    Raises:
        CheckpointError: a missing or unexpected key, or layers/ranks/masks that differ from the model's.
        ShapeMismatchError: an EMA tensor whose shape differs from its parameter's.
    """
    where = f"AdaLoRA allocator state of adapter {allocator.name!r}"
    missing = [k for k in _META_KEYS if k not in state] or sorted(set(state["tensors"]) - state.keys())
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}; {_RESUME_FIX}")
    extra = sorted(state.keys() - set(state["tensors"]) - set(_META_KEYS))
    if extra:
        raise CheckpointError(f"{where}: unexpected key {extra[0]!r}; {_RESUME_FIX}")
    ranks = {q: layer.rank[allocator.name] for q, layer in allocator.layers.items()}
    for q in sorted(ranks.keys() | state["layers"].keys()):
        if state["layers"].get(q) != ranks.get(q):
            raise CheckpointError(f"{where}: layer {q!r} has saved rank {state['layers'].get(q)} but rank "
                                  f"{ranks.get(q)} in the model; {_RESUME_FIX}")
    params = dict(allocator.factors())
    for key in state["tensors"]:
        which, _, factor = key.partition(".")
        p, value = params.get(factor), state[key]
        if which not in ("ema_ipt", "ema_unc") or p is None or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: unexpected key {key!r} (not an EMA tensor of an AdaLoRA factor of "
                                  f"the model); {_RESUME_FIX}")
        if value.shape != p.shape:
            raise ShapeMismatchError(f"{where}: {key!r} has shape {tuple(value.shape)} but the model's parameter "
                                     f"has {tuple(p.shape)}; {_RESUME_FIX}")
    for entry in ("rank_pattern", "rank_mask"):
        for q, mask in state[entry].items():
            if q not in ranks or len(mask) != ranks[q]:
                raise CheckpointError(f"{where}: {entry}[{q!r}] does not fit the model's layers "
                                      f"(rank {ranks.get(q)}); {_RESUME_FIX}")


def adalora_adapters(model: nn.Module) -> list[str]:
    """Names of the model's active AdaLoRA adapters (those ``adalora_step`` allocates for)."""
    from peftkit.methods.adalora import AdaLoRA  # adalora imports this module (it re-exports these functions)

    state = get_state(model)
    return [name for name in state.active if isinstance(state.configs.get(name), AdaLoRA)]


def allocator_states(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Adapter name → :func:`allocator_state_dict` of every allocator ``adalora_step`` made on ``model``."""
    return {name: alloc.state_dict() for name, alloc in model.__dict__.get(_ALLOCATORS, {}).items()}


def load_allocator_states(model: nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Recreate the allocators saved in ``states`` on ``model`` (a rebuilt model resuming its run).

    Every state is checked against the model before any allocator is replaced.

    Raises:
        CheckpointError: a name that is not an AdaLoRA adapter of the model, or a state that does not fit it
            (see :func:`check_allocator_state`).
    """
    from peftkit.methods.adalora import AdaLoRA, RankAllocator  # adalora imports this module

    configs = get_state(model).configs
    fresh: dict[str, RankAllocator] = {}
    for name, state in states.items():
        config = configs.get(name)
        if not isinstance(config, AdaLoRA):
            raise CheckpointError(f"AdaLoRA allocator state saved for adapter {name!r}, which is not an AdaLoRA "
                                  f"adapter of the model (adapters: {sorted(configs)}); {_RESUME_FIX}")
        fresh[name] = RankAllocator(model, name, config)
        check_allocator_state(fresh[name], state)
    for name, allocator in fresh.items():
        allocator.load_state_dict(states[name])
    model.__dict__.setdefault(_ALLOCATORS, {}).update(fresh)

