"""Checkpoints and adapters of multi-process runs (see :mod:`peftkit.train.distributed`).

- ``ddp``: every rank holds the same full state, so rank 0 writes the ordinary checkpoint of
  :mod:`peftkit.train.checkpoint` and every rank reads it back; it resumes on any number of processes.
- ``fsdp``: the adapter and the trained tensors are gathered to full tensors (a collective every rank
  joins) and rank 0 writes them in the ordinary layout, so ``pk.load_adapter`` and HF PEFT read them on
  one machine. The optimizer state stays sharded: each rank writes its own shards with
  :mod:`torch.distributed.checkpoint` into ``optimizer-sharded/`` (safetensors files through
  ``HuggingFaceStorageWriter``; param groups and scalars in ``optimizer-sharded.json``). Loading
  re-shards to whatever the reading run uses — any number of FSDP ranks, DDP, or a single process.
  They hold no AdaLoRA allocator state: :func:`peftkit.train.distributed.init` refuses AdaLoRA under FSDP
  (DDP checkpoints, the ordinary layout, carry it).

The directory is assembled under a temporary name that rank 0 chooses and renamed into place by
rank 0 once every rank's shards are written, so an interrupted save never looks complete. With several
machines ``checkpoint.save_dir`` must be a filesystem every rank sees.
"""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import CheckpointError
from peftkit.train import checkpoint as ckpt
from peftkit.train.distributed import Dist, seed_rank

SHARDED_DIR = "optimizer-sharded"
SHARDED_META = "optimizer-sharded.json"


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, DTensor shards gathered to full tensors (every rank must call this)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            out[key] = full.detach().to("cpu").contiguous().clone()
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_adapters(model: nn.Module, directory: Path, is_main: bool) -> None:
    """Gather every adapter and let rank 0 write them in HF PEFT's layout (as ``pk.save_adapter`` does)."""
    from peftkit.core.state import get_state
    from peftkit.io.atomic import write_atomic, write_text_atomic
    from peftkit.io.hf_format import CONFIG_NAME, WEIGHTS_NAME, adapter_config_dict, adapter_state_dict, file_tensors

    names = list(get_state(model).configs)
    for name in names:
        config = adapter_config_dict(model, name)
        tensors = file_tensors(model, name, full_tensors(adapter_state_dict(model, name)))
        if not is_main:
            continue
        target = directory if len(names) == 1 or name == "default" else directory / name
        target.mkdir(parents=True, exist_ok=True)
        write_atomic(target / WEIGHTS_NAME, functools.partial(_save_tensors, tensors))
        write_text_atomic(target / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(ctx: Dist, model: nn.Module, directory: str | Path) -> None:
    """Write the adapter(s) of a (possibly sharded) ``model`` to ``directory`` on rank 0; all ranks call."""
    if ctx.mode == "fsdp":
        _write_adapters(model, Path(directory), ctx.is_main)
    elif ctx.is_main:
        import peftkit as pk

        pk.save_adapter(model, directory)
    ctx.barrier()


def save_sharded_optimizer(ctx: Dist, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its optimizer shards to ``directory/optimizer-sharded``; rank 0 the JSON part."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    osd: Any = get_optimizer_state_dict(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{key}"] = value
            else:
                scalars.setdefault(str(fqn), {})[key] = value
    save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory / SHARDED_DIR), save_distributed=True))
    if ctx.is_main:
        (directory / SHARDED_META).write_text(json.dumps({"param_groups": osd["param_groups"], "scalars": scalars}))


def load_sharded_optimizer(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``optimizer`` from a checkpoint's sharded state, re-sharded to how ``model`` is laid out now.

    Works under FSDP with any number of ranks, under DDP, and in a single process.

    Raises:
        CheckpointError: the sharded files are missing or do not fit the optimizer.
    """
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    d = Path(path)
    template: Any = get_optimizer_state_dict(model, optimizer)  # initialises the state, laid out as the model is
    tensors = {
        f"{fqn}/{k}": v for fqn, st in template["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)
    }
    try:
        meta = json.loads((d / SHARDED_META).read_text())
        load(tensors, storage_reader=HuggingFaceStorageReader(str(d / SHARDED_DIR)))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {str(d)!r}: sharded optimizer state is missing or does not fit "
            f"this optimizer ({str(exc).splitlines()[0][:300]}); resume from another "
            "checkpoint or set checkpoint.resume=none"
        ) from exc
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, values in meta["scalars"].items():
        state.setdefault(fqn, {}).update(values)
    osd: Any = {"state": state, "param_groups": meta["param_groups"]}
    set_optimizer_state_dict(model, optimizer, osd)


def _load_full_optimizer(d: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-process/DDP checkpoint's optimizer (keyed by parameter index) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    meta = json.loads((d / "optimizer.json").read_text())
    full = ckpt._optimizer_from_files(load_file(str(d / "optimizer.safetensors")), meta)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = []
    for group in full["param_groups"]:
        groups.append({**group, "params": [order[i] for i in group["params"]]})
    osd: Any = {"state": {order[i]: st for i, st in full["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(
    ctx: Dist,
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
    """Write ``step-<step>`` from every rank (arguments as :func:`peftkit.train.checkpoint.save_checkpoint`).

    Returns:
        The checkpoint directory (the same path on every rank).
    """
    root = Path(save_dir)
    final = root / f"step-{step}"
    if ctx.mode != "fsdp":
        if ctx.is_main:
            ckpt.save_checkpoint(root, step, model, optimizer, trainable, trainer_state, config_yaml, save_adapter,
                                 keep_last)
        ctx.barrier()
        return final
    token = [uuid.uuid4().hex[:8] if ctx.is_main else ""]
    torch.distributed.broadcast_object_list(token, src=0)  # every rank writes into rank 0's directory
    with ckpt.staged(final, keep_last, token[0], owner=ctx.is_main) as tmp:
        ctx.barrier()  # rank 0 has created it
        params = dict(model.named_parameters())
        weights = full_tensors({n: params[n] for n in trainable})
        if save_adapter:
            _write_adapters(model, tmp, ctx.is_main)
        save_sharded_optimizer(ctx, model, optimizer, tmp)
        ctx.barrier()  # every rank's shards are on disk
        if ctx.is_main:
            save_file(weights, str(tmp / "trainable.safetensors"))
            ckpt.write_trainer_files(tmp, {**trainer_state, "step": step}, config_yaml)
    ctx.barrier()  # rank 0 has published it
    return final


def load_checkpoint(
    ctx: Dist, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0
) -> dict[str, Any]:
    """Restore a checkpoint (written by any number of processes) into this rank; returns the trainer state.

    Rank 0 continues the saved RNG stream; other ranks re-derive theirs from ``seed`` and the step.

    Raises:
        CheckpointError: a file is missing or a tensor does not fit the model.
    """
    d = Path(path)
    if ctx.mode != "fsdp":
        state = ckpt.load_checkpoint(d, model, optimizer)
    else:
        from torch.distributed.tensor import DTensor, distribute_tensor

        with ckpt.readable(d):
            weights = ckpt.read_tensors(d / "trainable.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                p = ckpt.fitting_parameter(d, params, name, value)
                if isinstance(p, DTensor):
                    value = distribute_tensor(value.to(p.device_mesh.device_type, p.dtype), p.device_mesh, p.placements)
                p.copy_(value)
        if (d / SHARDED_DIR).is_dir():
            load_sharded_optimizer(d, model, optimizer)
        else:
            _load_full_optimizer(d, model, optimizer)
        state = ckpt.restore_trainer_files(d)
    seed_rank(ctx, seed, int(state["step"]))
    return state
