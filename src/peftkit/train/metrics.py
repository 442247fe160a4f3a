"""Run reporting: a progress bar, ``metrics.jsonl``, TensorBoard when installed, PNG plots at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftkit.errors import require
from peftkit.io.atomic import save_figure, write_text_atomic
from peftkit.train.config import LoggingConfig

PLOTS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"))


class MetricsLogger:
    """Writes one JSON record per logged step and drives the progress bar.

    Args:
        save_dir: where ``metrics.jsonl``, ``tb/`` and the plots go.
        cfg: the logging section.
        total_steps: for the progress bar.
        start_step: first step of this process (after a resume).
    """

    def __init__(self, save_dir: str | Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0) -> None:
        self.dir = Path(save_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.path = self.dir / "metrics.jsonl"
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        elif start_step > 0 and self.path.exists():
            self._truncate_after(start_step)
        # (step, key) of every value in the log, so that a caller can avoid writing one twice
        self._written = {(r.get("step", 0), k) for r in read_metrics(self.path) for k in r}
        self.tb: Any = None
        if cfg.tensorboard == "true":
            self.tb = require("torch.utils.tensorboard", "tensorboard").SummaryWriter(str(self.dir / "tb"))  # type: ignore[attr-defined]
        elif cfg.tensorboard == "auto":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:
                self.tb = None
        self.bar: Any = None
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drop records a killed run wrote after its last checkpoint, so the log has each step once."""
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))  # a kill here keeps the whole log

    def has(self, step: int, key: str) -> bool:
        """Whether the log already holds ``key`` for ``step`` (this process's records and a resumed run's)."""
        return (step, key) in self._written

    def log(self, record: dict[str, Any]) -> None:
        """Record ``record`` (must carry ``step``) in the JSONL file and TensorBoard."""
        self._written.update((record["step"], k) for k in record)
        if self.cfg.jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def progress(self, loss: float, lr: float, tokens_per_s: float) -> None:
        """Advance the bar one step, showing loss, learning rate and tokens/s."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def plot_metrics(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``loss.png``, ``lr.png`` and ``grad_norm.png`` from training records.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install 'peftkit[plot]'``).
    """
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")  # type: ignore[attr-defined]
    plt = require("matplotlib.pyplot", "plot")
    written = []
    for key, title in PLOTS:
        points = [
            (r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))  # type: ignore[attr-defined]
        ax.plot(*zip(*points, strict=True))
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(out_dir) / f"{key}.png"
        save_figure(fig, path)
        plt.close(fig)  # type: ignore[attr-defined]
        written.append(path)
    return written


def process_memory(field: str = "VmRSS") -> int | None:
    """This process's memory figure ``field`` from ``/proc/self/status`` in bytes (``VmRSS`` resident now,
    ``VmHWM`` peak resident), or ``None`` where the file does not exist (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
