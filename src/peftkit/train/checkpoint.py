"""Training checkpoints: the adapter plus everything needed to resume bit-for-bit, with no pickles.

A checkpoint ``<save_dir>/step-<N>/`` holds:

- ``adapter_config.json`` + ``adapter_model.safetensors`` — the adapter in HF PEFT's format, loadable
  on its own (absent with ``peft.method=none``);
- ``trainable.safetensors`` — every trained tensor by parameter name (what resume restores);
- ``optimizer.safetensors`` + ``optimizer.json`` — optimizer tensors, and its groups and scalars;
- ``rng.safetensors`` + ``trainer_state.json`` — RNG states, step, data position, Python RNG;
- ``adalora.safetensors`` + ``adalora.json`` — AdaLoRA's rank-allocator state (importance EMAs, masks),
  only when the run trains AdaLoRA: without it a resumed run would re-allocate ranks from empty EMAs;
- ``run_config.yaml`` — the run's config (evaluation and merge rebuild the model from it).

It is written into a temporary directory beside its final place and renamed into place, so a crash
mid-write leaves either the previous checkpoints or the complete new one, never a torn directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import CheckpointError
from peftkit.methods.adalora_state import adalora_adapters, allocator_states, load_allocator_states

_STEP = re.compile(r"^step-(\d+)$")
#: What :func:`staged` and :func:`publish` leave behind in a run's ``save_dir`` when the process dies mid-save of a
#: ``step-N`` or of ``final`` (the token is 8 hex digits).
_STALE = re.compile(r"^\.(tmp|old)-(step-\d+|final)-[0-9a-f]{8}$")
STATE_FILE = "trainer_state.json"
ALLOCATOR_TENSORS, ALLOCATOR_META = "adalora.safetensors", "adalora.json"
logger = logging.getLogger("peftkit")


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[str],
    trainer_state: dict[str, Any],
    config_yaml: str,
    save_adapter: bool = True,
    keep_last: int = 0,
) -> Path:
    """Write ``step-<step>`` atomically and prune old checkpoints.

    Args:
        save_dir: the run's output directory.
        step: optimizer steps done.
        model: the model (its adapter and ``trainable`` parameters are saved).
        optimizer: its state is saved.
        trainable: names of the parameters the run trains.
        trainer_state: JSON-able loop state (data position, metrics so far, ...).
        config_yaml: the run config as YAML text.
        save_adapter: also write the adapter in HF PEFT format (needs an adapter on the model).
        keep_last: keep this many newest checkpoints (0: all).

    Returns:
        The checkpoint directory.
    """
    final = Path(save_dir) / f"step-{step}"
    with staged(final, keep_last) as tmp:
        _write_contents(tmp, model, optimizer, trainable, {**trainer_state, "step": step}, config_yaml, save_adapter)
    return final


@contextlib.contextmanager
def staged(final: Path, keep_last: int, token: str | None = None, owner: bool = True) -> Iterator[Path]:
    """A temporary directory beside ``final`` to write a checkpoint into; it is published when the block ends.

    On success the directory is renamed to ``final`` and older checkpoints are pruned (:func:`publish`);
    on an exception it is removed, leaving the previous checkpoints as they were.

    Args:
        final: the directory to publish (``<save_dir>/step-<N>``, ``<save_dir>/final``, a merged model); its parent
            is created.
        keep_last: keep this many newest checkpoints (0: all).
        token: makes the temporary names unique (default: a random one); every rank of a run passes the same.
        owner: whether this process creates, publishes and removes the directory (rank 0 alone, when
            several processes write into it).
    """
    token = token or uuid.uuid4().hex[:8]
    tmp = final.parent / f".tmp-{final.name}-{token}"
    if owner:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if owner:
            publish(tmp, final, keep_last, token)
    finally:
        if owner and tmp.exists():
            shutil.rmtree(tmp)


def publish(tmp: Path, final: Path, keep_last: int, token: str) -> None:
    """Rename the complete checkpoint ``tmp`` to ``final``, then keep only the ``keep_last`` newest (0: all).

    ``token`` names the temporary directory an older checkpoint of the same step is moved to.
    """
    trash = final.parent / f".old-{final.name}-{token}"
    if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one aside first
        os.replace(final, trash)
    os.replace(tmp, final)  # killed before this, the complete old one is still there to put back (remove_stale)
    if trash.exists():
        shutil.rmtree(trash)
    if keep_last:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old)


def _write_contents(
    d: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[str],
    trainer_state: dict[str, Any],
    config_yaml: str,
    save_adapter: bool,
) -> None:
    if save_adapter:
        import peftkit as pk

        pk.save_adapter(model, d)
    params = dict(model.named_parameters())
    save_file({n: params[n].detach().contiguous().cpu() for n in trainable}, str(d / "trainable.safetensors"))
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(d / "optimizer.safetensors"))
    (d / "optimizer.json").write_text(json.dumps(meta))
    write_allocator_files(d, model)
    write_trainer_files(d, trainer_state, config_yaml)


def write_allocator_files(d: Path, model: nn.Module) -> None:
    """AdaLoRA's allocator states: tensors as ``<adapter>/<key>`` in safetensors, the rest in JSON (if any)."""
    states = allocator_states(model)
    if not states:
        return
    tensors = {f"{name}/{key}": value.detach().contiguous().cpu()
               for name, state in states.items() for key, value in state.items() if isinstance(value, torch.Tensor)}
    meta = {name: {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)} for name, state in states.items()}
    save_file(tensors, str(d / ALLOCATOR_TENSORS))
    (d / ALLOCATOR_META).write_text(json.dumps(meta))


def restore_allocator_files(d: Path, model: nn.Module, step: int) -> None:
    """Recreate the AdaLoRA allocators saved in ``d``; an older checkpoint without them only warns.

    Raises:
        CheckpointError: the files are corrupt or do not fit the model.
    """
    if not (d / ALLOCATOR_META).is_file():
        if step > 0 and adalora_adapters(model):
            logger.warning("checkpoint %r has no AdaLoRA allocator state (%s; written by an older peftkit): "
                           "rank allocation restarts from empty importance EMAs, so the resumed run will not "
                           "match an uninterrupted one", str(d), ALLOCATOR_META)
        return
    try:
        meta = json.loads((d / ALLOCATOR_META).read_text())
        tensors = load_file(str(d / ALLOCATOR_TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(d)!r}: AdaLoRA allocator state is incomplete or corrupt ({exc}); "
                              "resume from another checkpoint or set checkpoint.resume=none") from exc
    states: dict[str, dict[str, Any]] = {name: dict(values) for name, values in meta.items()}
    for key, value in tensors.items():
        name, _, rest = key.partition("/")
        states.setdefault(name, {})[rest] = value
    load_allocator_states(model, states)


def write_trainer_files(d: Path, trainer_state: dict[str, Any], config_yaml: str) -> None:
    """RNG states, run config and ``trainer_state.json`` (last: it marks the checkpoint complete)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(d / "rng.safetensors"))
    py_state = random.getstate()
    state = {**trainer_state, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    (d / "run_config.yaml").write_text(config_yaml)
    (d / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks a complete checkpoint


def list_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete ``step-N`` checkpoints in ``save_dir``, oldest first (temporary directories ignored)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def remove_stale(save_dir: str | Path) -> int:
    """Delete the partial checkpoints a killed save left in ``save_dir``; returns how many.

    They are never resumed from (:func:`list_checkpoints` ignores them) but can be as large as a checkpoint.
    A complete previous checkpoint moved aside (``.old-``) whose replacement never got into place is put back.
    Call it only while no save into ``save_dir`` is under way (at the start of a run, on one process).
    """
    return _clean(Path(save_dir), _STALE, _complete)


def remove_partial_copies(final: Path) -> int:
    """:func:`remove_stale` for one directory written with :func:`staged` (a merged model): the copies a killed save
    left beside ``final``, a complete previous one (with its ``config.json``) put back; returns how many went."""
    pattern = re.compile(rf"^\.(tmp|old)-({re.escape(final.name)})-[0-9a-f]{{8}}$")
    return _clean(final.parent, pattern, lambda d: (d / "config.json").is_file())


def _clean(root: Path, pattern: re.Pattern[str], complete: Callable[[Path], bool]) -> int:
    """Remove the directories in ``root`` named by ``pattern`` (``.tmp-``/``.old-`` + the final name + token),
    first putting back an ``.old-`` one that is ``complete`` and whose final name is free."""
    stale = [(m, p) for p in root.iterdir() if (m := pattern.match(p.name)) and p.is_dir()] if root.is_dir() else []
    removed = 0
    for m, p in sorted(stale, key=lambda mp: mp[0].group(1) != "old"):  # restore before removing
        if m.group(1) == "old" and not (root / m.group(2)).exists() and complete(p):
            os.replace(p, root / m.group(2))  # killed between publish()'s two renames
            continue
        shutil.rmtree(p)
        removed += 1
    return removed


def _complete(d: Path) -> bool:
    """Whether ``d`` holds the file written last into a ``step-N`` (trainer state) or ``final`` (run config)."""
    return (d / STATE_FILE).is_file() or (d.name.startswith(".old-final-") and (d / "run_config.yaml").is_file())


def resolve_resume(resume: str, save_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``none`` → None, ``auto`` → the latest (or None), else the path.

    Raises:
        CheckpointError: an explicit path that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(save_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
            "pass a step-N directory, 'auto' or 'none'"
        )
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable: list[str] | None = None
) -> dict[str, Any]:
    """Restore trained tensors, optimizer, AdaLoRA allocator and RNG states from ``path``; returns the trainer state.

    Args:
        path: a ``step-N`` directory.
        model: receives the trained tensors.
        optimizer: receives the optimizer state (``None``: not restored).
        trainable: the parameters this run trains; each must be in the checkpoint (``None``: not checked).

    Raises:
        CheckpointError: a file is missing or corrupt, or the checkpoint was written by a run of another
            model or method; nothing is restored then.
    """
    d = Path(path)
    sharded = (d / "optimizer-sharded").is_dir()  # written by an FSDP run
    with readable(d):  # every file is read before anything is restored
        weights = read_tensors(d / "trainable.safetensors")
        state = _read_state(d)
        rng = read_tensors(d / "rng.safetensors")
        if optimizer is not None and not sharded:
            saved_optimizer = _optimizer_from_files(read_tensors(d / "optimizer.safetensors"),
                                                    _json(d / "optimizer.json"))
    params = dict(model.named_parameters())
    targets = {name: fitting_parameter(d, params, name, value) for name, value in weights.items()}
    unsaved = [name for name in trainable or [] if name not in weights]
    if unsaved:
        raise CheckpointError(f"checkpoint {str(d)!r} has no tensor for {unsaved[0]!r} ({len(unsaved)} trained "
                              f"parameters missing): it was written by another model or method; {_AFRESH}")
    restore_allocator_files(d, model, int(state.get("step", 0)))  # first to change: it checks all before changing
    with torch.no_grad():
        for name, value in weights.items():
            targets[name].copy_(value)
    if optimizer is not None and sharded:
        from peftkit.train.dist_checkpoint import load_sharded_optimizer

        load_sharded_optimizer(d, model, optimizer)
    elif optimizer is not None:
        try:
            optimizer.load_state_dict(saved_optimizer)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {str(d)!r}: the optimizer state belongs to another run ({exc}); "
                                  f"{_AFRESH}") from exc
    return restore_trainer_files(d, state, rng)


def _read_state(d: Path) -> dict[str, Any]:
    """``trainer_state.json``, with the entries a resumed run reads.

    Raises:
        ValueError: an entry is missing (:func:`readable` makes it a :class:`CheckpointError`).
    """
    state: dict[str, Any] = _json(d / STATE_FILE)
    for key in ("step", "history", "python_rng"):
        if key not in state:
            raise ValueError(f"{STATE_FILE} has no {key!r} entry")
    return state


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a truncated or corrupt one is a ``ValueError`` naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as exc:  # its message does not name the file
        raise ValueError(f"{path.name}: {exc}") from exc


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc


@contextlib.contextmanager
def readable(d: Path) -> Iterator[None]:
    """Turn a missing, truncated or corrupt file read in the block into a :class:`CheckpointError` on ``d``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {str(d)!r} is incomplete or corrupt ({exc}); resume from an earlier one with "
            f"checkpoint.resume=PATH (or remove this one: checkpoint.resume=auto then takes the previous)"
        ) from exc


#: What to do with a checkpoint that does not belong to the run being resumed.
_AFRESH = ("resume it with the config it was written with, or start afresh in another checkpoint.save_dir "
           "(or with checkpoint.resume=none)")


def fitting_parameter(d: Path, params: dict[str, nn.Parameter], name: str, value: torch.Tensor) -> nn.Parameter:
    """The model's parameter ``name`` that the saved ``value`` is restored into.

    Raises:
        CheckpointError: the model has no such parameter, or one of another shape.
    """
    p = params.get(name)
    if p is None or tuple(p.shape) != tuple(value.shape):
        model_has = f"the model's is {tuple(p.shape)}" if p is not None else "the model has no such parameter"
        raise CheckpointError(
            f"checkpoint {str(d)!r} tensor {name!r} of shape {tuple(value.shape)} does not fit the model "
            f"({model_has}): it was written by another model or method; {_AFRESH}"
        )
    return p


def restore_trainer_files(
    d: Path, state: dict[str, Any] | None = None, rng: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Restore the RNG states saved in ``d`` (or given as ``rng``); returns the trainer state without its Python RNG.

    Raises:
        CheckpointError: ``trainer_state.json`` or ``rng.safetensors`` is missing or corrupt.
    """
    with readable(d):
        state = _read_state(d) if state is None else state
        rng = read_tensors(d / "rng.safetensors") if rng is None else rng
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    py = state.pop("python_rng")
    random.setstate((py[0], tuple(py[1]), py[2]))
    return dict(state)
