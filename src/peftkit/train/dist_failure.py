"""The failure path of multi-process runs (see :mod:`peftkit.train.distributed`): no rank hangs.

A rank that raises writes its error into the rendezvous store before re-raising; a watchdog thread on
every rank polls that key and ends its process with a message naming the failed rank, so no rank hangs
in a collective. A rank that dies without a word closes its sockets, which makes the peers' next
collective fail at once (gloo) or after ``train.dist_timeout`` seconds at the latest; ``torchrun`` then
stops the remaining workers. Checkpoints are written atomically, so the last complete one survives any
of this.

:func:`guard` wraps a run: on success every rank leaves the process group together (:func:`shutdown`);
on failure the rank where it started re-raises its error and every other rank raises a
:class:`~peftkit.errors.DistributedError` naming the cause and the checkpoint to resume from.
:func:`inject_raise` and :func:`fault_due` are the test-only fault injection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftkit.errors import DistributedError

if TYPE_CHECKING:
    from peftkit.train.distributed import Dist

#: Test-only fault injection: ``N`` or ``N@R`` — raise after optimizer step N (on rank R only).
FAULT_RAISE_ENV = "PEFTKIT_FAULT_RAISE_AFTER_STEP"
#: Store key a failing rank writes its error to (read by every rank's watchdog).
FAIL_KEY = "peftkit/failed"
#: Store counter the peers bump once they have printed why they stop.
ACK_KEY = "peftkit/failure-seen"
#: The failing rank waits at most this long for the peers' acknowledgements before it exits.
_ACK_WAIT_S = 3.0
#: A peer that printed the failure exits after this delay, so the launcher names the failing rank as root cause.
_PEER_EXIT_DELAY_S = 5.0
#: Exit status of a rank stopped because another rank failed.
EXIT_PEER_FAILED = 3


class Watchdog(threading.Thread):
    """Ends this process when another rank has reported a failure (or the store has vanished)."""

    def __init__(self, store: Any, rank: int, interval: float = 0.2) -> None:
        super().__init__(name="peftkit-dist-watchdog", daemon=True)
        self.store, self.rank, self.interval = store, rank, interval
        self.stopped = threading.Event()
        self.reason: str | None = None  # why another rank stopped the run, once seen

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not self.store.check([FAIL_KEY]):
                    continue
                reason = self.store.get(FAIL_KEY).decode()
            except Exception as exc:  # noqa: BLE001 — the store lives in another process that is gone
                reason = f"the rendezvous store stopped answering ({exc}); the process hosting it has died"
            if self.stopped.is_set():
                return
            self.reason = reason
            print(f"peftkit: rank {self.rank}: stopping because {reason}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                self.store.add(ACK_KEY, 1)
            time.sleep(_PEER_EXIT_DELAY_S)  # torchrun stops this worker once the failing rank has exited
            os._exit(EXIT_PEER_FAILED)  # the main thread may be blocked inside a collective: end it here


def fault_due(spec: str, done: int, ctx: Dist) -> bool:
    """Whether a test fault ``N`` / ``N@R`` (after step N, on rank R or every rank) fires now."""
    step, _, rank = spec.partition("@")
    return done == int(step) and (not rank or int(rank) == ctx.rank)


def inject_raise(done: int, ctx: Dist) -> None:
    """Test-only: raise after the step named by ``PEFTKIT_FAULT_RAISE_AFTER_STEP``.

    Raises:
        RuntimeError: the fault fired.
    """
    spec = os.environ.get(FAULT_RAISE_ENV)
    if spec is not None and fault_due(spec, done, ctx):
        raise RuntimeError(f"injected fault after step {done} on rank {ctx.rank} ({FAULT_RAISE_ENV}={spec})")


def _is_comm_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (connection closed, timeout)."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out", "NCCL", "gloo")
    )


class _Terminated(Exception):
    """SIGTERM arrived (torchrun stops every worker once one has failed)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated("stopped by the launcher (SIGTERM); torchrun stops every worker when one fails")


def _announce(ctx: Dist, exc: BaseException, wait: bool) -> None:
    """Tell the other ranks (through the store) that this rank failed and why.

    With ``wait`` (this rank is where the failure started) wait briefly until the peers printed it.
    """
    if ctx.watchdog is None:
        return
    ctx.watchdog.stopped.set()
    store = ctx.watchdog.store
    with contextlib.suppress(Exception):
        summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        store.compare_set(FAIL_KEY, "", f"rank {ctx.rank} failed with {summary}")  # the first failure wins
        deadline = time.monotonic() + (_ACK_WAIT_S if wait else 0.0)
        while store.add(ACK_KEY, 0) < ctx.world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)


def shutdown(ctx: Dist) -> None:
    """Leave the process group cleanly: everyone done → watchdogs off → everyone off → destroy."""
    if not ctx.active or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    if ctx.watchdog is not None:
        ctx.watchdog.stopped.set()
        ctx.watchdog.join()
    torch.distributed.barrier()  # no rank's store may disappear while a peer's watchdog still polls it
    torch.distributed.destroy_process_group()


def _cause(ctx: Dist, exc: BaseException, seen: str | None) -> str | None:
    """Why this rank stops when the failure started elsewhere; ``None`` when it started here."""
    if seen is not None:
        return f"stopped because {seen}"
    if isinstance(exc, _Terminated):
        return f"{exc}; see the failing rank's log"
    if _is_comm_failure(exc):
        return (
            f"a collective failed because another rank died or stopped answering "
            f"({str(exc).splitlines()[0][:300]}); see that rank's log"
        )
    return None


@contextlib.contextmanager
def guard(ctx: Dist, save_dir: str | Path) -> Iterator[None]:
    """Run a distributed job: on success leave cleanly; on failure stop every rank with a clear error.

    Raises:
        DistributedError: the failure started on another rank (the message names it when known, and the
            last complete checkpoint to resume from); an exception raised on this rank is re-raised
            after the other ranks were told.
    """
    previous = None
    if ctx.active and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except BaseException as exc:
        if not ctx.active:
            raise
        cause = _cause(ctx, exc, ctx.watchdog.reason if ctx.watchdog is not None else None)
        _announce(ctx, exc, wait=cause is None)
        if cause is None:
            raise
        from peftkit.train.checkpoint import list_checkpoints

        found = list_checkpoints(save_dir)
        where = (
            f"the last complete checkpoint is {found[-1]}; resume with checkpoint.resume=auto"
            if found
            else "no checkpoint was completed yet"
        )
        raise DistributedError(f"rank {ctx.rank} of {ctx.world}: {cause}; {where}") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    shutdown(ctx)
