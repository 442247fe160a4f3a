"""Atomic writes: a file is either its old content or its complete new content, never a torn mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` (its return value is ignored), then move the file onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure as PNG to ``path`` atomically (a reader never sees a half-written image)."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def output_dir(path: str | Path, name: str) -> Path:
    """Create the output directory ``path`` (and its parents) if needed, before any work is spent on it.

    Args:
        path: the directory.
        name: what the user set to choose it (``checkpoint.save_dir``, ``--out``), for the message.

    Raises:
        ConfigError: ``path`` is an existing file, or it cannot be created or written.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{name}={str(p)!r} is a file, not a directory; choose a directory to write into")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{name}={str(p)!r} cannot be created ({exc.strerror or exc}); "
                          "choose a writable directory") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={str(p)!r} is not writable; choose a writable directory")
    return p


@contextlib.contextmanager
def run_output_dir(path: str | Path, name: str) -> Iterator[Path]:
    """:func:`output_dir` for the duration of some work: if the work fails before writing anything there, the
    directories this call created are removed again (a failed run leaves no empty ``save_dir`` behind).

    Only empty directories are removed, so whatever the work did write (checkpoints, partial tables) stays.
    """
    p = Path(path).absolute()
    created = [d for d in (p, *p.parents) if not d.exists()]  # deepest first
    out = output_dir(path, name)
    try:
        yield out
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (or already gone): keep it and its parents
                break
        raise
