"""Multi-process training on PyTorch's own engine: ``torchrun`` launches, DDP replicates, FSDP2 shards.

``train.parallel`` picks the strategy:

- ``none`` — one process (the default);
- ``ddp`` — :class:`~torch.nn.parallel.DistributedDataParallel`. DDP registers gradient hooks only on
  parameters with ``requires_grad``, so only the adapter's gradients are all-reduced; the frozen base
  is never communicated after the one-time consistency broadcast at start-up;
- ``fsdp`` — FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every transformer block and then on
  the root, so the base and the adapters are sharded per block. Frozen parameters are all-gathered for
  the forward pass but get no gradient reduce-scatter. AdaLoRA is refused here (its rank allocator needs
  whole factors); it runs under DDP.

Launch with ``torchrun --nproc-per-node N -m peftkit train CONFIG train.parallel=ddp``; rank, world size
and rendezvous come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``). The backend is NCCL on CUDA devices and gloo on CPU.

``train.batch_size`` is the per-rank micro-batch: step ``i`` takes the same global batch of
``batch_size × world`` examples a single process with that batch would take, and rank ``r`` keeps its
``r``-th slice. DDP and FSDP average the ranks' gradients; each rank's loss is weighted by its share of the
global batch's target tokens (:func:`global_mean_factor`), so N ranks with batch ``b`` train exactly like one
process with batch ``N·b``, also when the ranks' slices hold different numbers of target tokens.

The failure path (a watchdog per rank, so no rank hangs when another fails) is
:mod:`peftkit.train.dist_failure`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from peftkit.errors import ConfigError, DistributedError
from peftkit.train.config import RunConfig
from peftkit.train.dist_failure import Watchdog

PARALLEL_MODES = ("none", "ddp", "fsdp")
_LAUNCH_HINT = "launch with: torchrun --nproc-per-node N -m peftkit train CONFIG train.parallel={mode}"
T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the run.

    Attributes:
        mode: ``none``, ``ddp`` or ``fsdp``.
        rank: global rank (0 in a single process).
        world: number of processes.
        local_rank: rank on this machine (picks the CUDA device).
    """

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    watchdog: Watchdog | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """True when a process group is in use."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows the progress bar and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.active:
            torch.distributed.barrier()


def check(cfg: RunConfig) -> None:
    """Refuse a ``train.parallel`` setting that cannot run, before anything is set up or written.

    Raises:
        ConfigError: ``ddp``/``fsdp`` without torchrun's environment, ``none`` under torchrun with several
            processes, or ``ddp``/``fsdp`` with an optimizer feature or PEFT method that cannot run data-parallel
            (LISA; GaLore, AdaLoRA and LoRA's layer_replication under FSDP).
    """
    parallel = cfg.train.parallel
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel={parallel!r} is invalid; allowed: {', '.join(PARALLEL_MODES)}")
    if parallel == "none":
        world = os.environ.get("WORLD_SIZE", "1")
        if world.isdigit() and int(world) > 1:  # each process would train alone and write the same save_dir
            raise ConfigError(
                f"train.parallel='none' but torchrun started {world} processes (WORLD_SIZE={world}); "
                "set train.parallel=ddp or train.parallel=fsdp, or run one process: python -m peftkit train CONFIG"
            )
        return
    if cfg.optimizer.lisa_layers:
        raise ConfigError(
            f"optimizer.lisa_layers={cfg.optimizer.lisa_layers} cannot run with train.parallel="
            f"{parallel!r} (LISA changes which parameters train after DDP/FSDP fixed them); "
            "set optimizer.lisa_layers=0 or train.parallel=none"
        )
    if parallel == "fsdp" and cfg.optimizer.name == "galore":
        raise ConfigError(
            "optimizer.name='galore' cannot run with train.parallel='fsdp' (GaLore projects "
            "whole 2-D gradients, FSDP shards them); use train.parallel=ddp or optimizer.name=adamw"
        )
    if parallel == "fsdp" and cfg.peft.method == "adalora":
        # The rank allocator scores and masks whole factors (importance EMAs, a global k-th value, λ masks) and
        # the orthogonality penalty needs whole P and Q; under FSDP they are DTensor shards.
        raise ConfigError(
            "peft.method='adalora' cannot run with train.parallel='fsdp' (AdaLoRA's rank allocator and "
            "orthogonality penalty need whole factors, FSDP shards them); use train.parallel=ddp"
        )
    if parallel == "fsdp" and cfg.peft.options.get("layer_replication"):
        raise ConfigError(
            "peft.layer_replication cannot run with train.parallel='fsdp' (replicated blocks share their base "
            "weights, which FSDP refuses to shard across its per-block groups); use train.parallel=ddp"
        )
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"train.parallel={parallel!r} needs torchrun's environment ({', '.join(missing)} "
            f"unset); {_LAUNCH_HINT.format(mode=parallel)}"
        )


def init(cfg: RunConfig) -> Dist:
    """Join the process group ``torchrun`` set up (for ``train.parallel`` ``ddp``/``fsdp``), start the watchdog.

    Args:
        cfg: the run config (``train.parallel``, ``train.dist_timeout``: the collective timeout).

    Returns:
        This process's :class:`Dist` (``mode="none"`` for a single process).

    Raises:
        ConfigError: see :func:`check`.
    """
    check(cfg)
    if cfg.train.parallel == "none":
        return Dist()
    parallel = cfg.train.parallel
    dist = torch.distributed
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.train.dist_timeout))
    ctx = Dist(parallel, rank, world, local_rank)
    # The default store is the rendezvous TCPStore; the watchdog polls its own clone of the client.
    store = dist.distributed_c10d._get_default_store()
    ctx.watchdog = Watchdog(store.clone() if hasattr(store, "clone") else store, rank)
    ctx.watchdog.start()
    return ctx


def pick_device(ctx: Dist, name: str) -> torch.device:
    """``auto`` → this rank's CUDA device (``cuda:LOCAL_RANK``) when available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    return usable_device(name)


def usable_device(name: str) -> torch.device:
    """The device ``train.device=name`` names, once a tensor could be put on it.

    Raises:
        ConfigError: ``name`` is not a device, or this machine has no such device (``cuda`` without CUDA, an
            index past the last GPU).
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device name; allowed: auto, cpu, cuda, cuda:N, "
                          "or another torch device such as xpu or mps") from None
    try:
        if device.type == "meta":  # holds no values: nothing could be trained or evaluated on it
            raise RuntimeError("meta tensors hold no data")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # torch's "not compiled with CUDA enabled" is an assertion
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0][:120]
        raise ConfigError(f"train.device={name!r} cannot be used on this machine ({reason}); "
                          "set train.device=auto, cpu or an available cuda:N") from None
    return device


def seed_rank(ctx: Dist, seed: int, step: int) -> None:
    """Give ranks other than 0 their own dropout stream (rank 0 keeps the single-process one)."""
    if ctx.rank > 0:
        torch.manual_seed(seed + 1_000_003 * ctx.rank + step)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: classes in ``_no_split_modules`` (HF), else the longest ModuleList.

    Nested matches are skipped (a block inside a block is sharded with its parent).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[tuple[str, nn.Module]] = []
    for qualname, module in model.named_modules():
        if type(module).__name__ in names and not any(qualname.startswith(p + ".") for p, _ in found):
            found.append((qualname, module))
    if found:
        return [m for _, m in found]
    lists: list[nn.ModuleList] = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=lambda m: sum(1 for _ in m))) if lists else []


def wrap(model: nn.Module, ctx: Dist, device: torch.device) -> nn.Module:
    """Prepare the adapted ``model`` (already on ``device``) for ``ctx.mode``.

    Returns:
        The module to call for the forward pass: the DDP wrapper for ``ddp``; ``model`` itself for
        ``fsdp`` (sharded in place: its parameters become DTensors, names unchanged) and ``none``.

    Raises:
        DistributedError: the model has no trainable parameter.
    """
    if not ctx.active:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedError("the model has no trainable parameters to synchronise; check peft.method")
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables, ...) are identical on every rank and never trained: no per-step broadcast.
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class SilentLogger:
    """What ranks other than 0 log: nothing (same methods as ``MetricsLogger``)."""

    def has(self, step: int, key: str) -> bool:
        """Nothing is logged here."""
        return False

    def log(self, record: dict[str, Any]) -> None:
        """Drop ``record``."""

    def progress(self, loss: float, lr: float, tokens_per_s: float) -> None:
        """No progress bar."""

    def close(self) -> None:
        """Nothing to close."""


def rank_slice(batch: Sequence[T], ctx: Dist) -> list[T]:
    """Rank ``ctx.rank``'s share of a global batch of ``per_rank × world`` items."""
    per_rank = len(batch) // ctx.world
    return list(batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank])


def as_float(value: torch.Tensor | float) -> float:
    """A Python float of a scalar tensor; a DTensor (e.g. FSDP's gradient norm) is reduced first."""
    if isinstance(value, torch.Tensor):
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            value = value.full_tensor()
        return float(value.detach())
    return float(value)


def global_mean_factor(items: int, ctx: Dist) -> float:
    """The factor turning this rank's mean loss over ``items`` terms into its share of the global mean.

    DDP and FSDP average the ranks' gradients. A rank's loss is a mean over its own terms, whose count differs
    between ranks when the loss covers responses only; scaling by ``world · items / Σ items`` makes the average
    the mean over every rank's terms, as one process with the whole batch computes it.
    """
    if not ctx.active:
        return 1.0
    t = torch.tensor([float(items)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    total = float(t[0])
    return ctx.world * items / total if total > 0 else 1.0


def reduce_step(loss: float, tokens: int, ctx: Dist) -> tuple[float, int]:
    """The mean loss over ranks and the total token count (as they are in a single process)."""
    if not ctx.active:
        return loss, tokens
    t = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return float(t[0]) / ctx.world, int(t[1])


def agree(value: int, ctx: Dist, what: str) -> None:
    """Check that every rank holds the same ``value`` (e.g. the resumed step).

    Raises:
        DistributedError: the ranks disagree (the message lists each rank's value).
    """
    if not ctx.active:
        return
    values: list[Any] = [None] * ctx.world
    torch.distributed.all_gather_object(values, value)
    if len(set(values)) != 1:
        raise DistributedError(
            f"ranks disagree on {what}: {values} (rank order); every rank must see the same "
            "save_dir and config — on several machines put save_dir on a shared filesystem"
        )


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
