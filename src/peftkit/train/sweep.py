"""``peftkit sweep``: one config, several LoRA ranks/alphas, one table (seed 002's measurements).

For each (rank, alpha) — alpha defaults to ``alpha_per_rank · rank`` — run the config with
``peft.rank`` / ``peft.alpha`` overridden and ``checkpoint.save_dir`` suffixed (a method with a rank but no alpha,
such as VeRA, HRA or MiSS, sweeps its ranks alone, in ``r<rank>``), then report trainable
and total parameters, trainable %, first/last loss and mean/last gradient norm per run, as Markdown
(``sweep.md``) and JSON (``sweep.json``) in the base ``save_dir``, rewritten after every run. A run that fails
(an exception such as CUDA out of memory, or a loss that is not finite) gets a row with its ``error`` and the
sweep goes on; the command then exits with status 3, naming the failed runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from peftkit.errors import ConfigError, require
from peftkit.io.atomic import output_dir, save_figure, write_text_atomic
from peftkit.train.config import PEFT_METHODS, RunConfig, load_config
from peftkit.train.data import check_data_files
from peftkit.train.loop import train
from peftkit.train.tasks import peft_config

COLUMNS = (
    "rank",
    "alpha",
    "trainable",
    "total",
    "trainable_pct",
    "first_loss",
    "last_loss",
    "mean_grad_norm",
    "last_grad_norm",
    "seconds",
)


def run_sweep(
    config: str,
    ranks: list[int],
    alphas: list[float] | None = None,
    alpha_per_rank: float | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train ``config`` once per (rank, alpha) and return one result row per run.

    A run that fails gets a row with ``rank``, ``alpha`` and ``error``, and the sweep goes on; ``sweep.json`` and
    ``sweep.md`` are rewritten after every run, so finished results survive a later run that kills the process.

    Args:
        config: a YAML run config whose ``peft.method`` has a rank (:func:`sweepable_methods`); one without an
            alpha (VeRA) sweeps its ranks alone.
        ranks: ranks to run.
        alphas: alphas to run for each rank; ``None`` uses ``alpha_per_rank · rank``.
        alpha_per_rank: alpha/rank when ``alphas`` is not given (``None``: seed 002's 2).
        overrides: extra ``key.sub=value`` overrides applied to every run.

    Raises:
        ConfigError: the method has no rank, or no alpha while ``alphas`` or ``alpha_per_rank`` is given; any run's
            config is invalid (checked for all of them before the first trains), a data file does not exist, or
            ``checkpoint.save_dir`` is a file or not writable.
    """
    base = load_config(config, overrides)
    check_data_files(base.data.train, base.data.eval)  # the same for every run: one error, before any trains
    method = peft_config(base)
    if not hasattr(method, "rank"):
        raise ConfigError(f"peft.method={base.peft.method!r} has no rank to sweep; use a method with one "
                          f"({', '.join(sweepable_methods())}), 'peftkit compare' across methods, or one "
                          "'peftkit train CONFIG peft.FIELD=VALUE' per size")
    has_alpha = hasattr(method, "alpha")
    if not has_alpha and (alphas is not None or alpha_per_rank is not None):
        raise ConfigError(f"peft.method={base.peft.method!r} has a rank but no alpha: drop --alphas and "
                          "--alpha-per-rank to sweep its ranks alone")
    runs = []
    for rank in ranks:
        for alpha in (alphas or [(2.0 if alpha_per_rank is None else alpha_per_rank) * rank]) if has_alpha else [None]:
            out = f"{base.checkpoint.save_dir}/r{rank}" + ("" if alpha is None else f"-a{alpha:g}")
            cfg = load_config(
                config,
                [
                    *(overrides or []),
                    f"peft.rank={rank}",
                    *([] if alpha is None else [f"peft.alpha={alpha}"]),
                    f"checkpoint.save_dir={out}",
                    "logging.plots=false",
                ],
            )
            peft_config(cfg)  # every run's method fields are checked before the first one trains
            runs.append((rank, alpha, cfg))
    root = output_dir(base.checkpoint.save_dir, "checkpoint.save_dir")
    rows: list[dict[str, Any]] = []
    for i, (rank, alpha, cfg) in enumerate(runs, 1):
        print(f"sweep: training {_named(rank, alpha)} ({i}/{len(runs)}) in {cfg.checkpoint.save_dir}",
              flush=True)
        rows.append(_run(rank, alpha, cfg))
        # After every run: a later run that fails, or kills the process (out of memory), keeps these results.
        write_text_atomic(root / "sweep.json", json.dumps(rows, indent=1))
        write_text_atomic(root / "sweep.md", format_table(rows) + "\n")
    if base.logging.plots and any("error" not in r for r in rows):
        plot_sweep(rows, root / "sweep.png")
    return rows


def sweepable_methods() -> list[str]:
    """The ``peft.method`` names whose config has a ``rank``, which a sweep sets (and ``alpha`` where it has one)."""
    import peftkit as pk

    return [name for name, cls in PEFT_METHODS.items()
            if cls is not None and "rank" in {f.name for f in dataclasses.fields(getattr(pk, cls))}]


def _named(rank: int, alpha: float | None, sep: str = ", ") -> str:
    """``rank 8, alpha 16`` (``rank 8`` for a method without alpha), for messages."""
    return f"rank {rank}" + ("" if alpha is None else f"{sep}alpha {alpha:g}")


def _alpha(alpha: float | None) -> str:
    """A table cell: ``16``, ``0.5``, or ``-`` for a method without alpha."""
    return "-" if alpha is None else f"{alpha:g}"


def _run(rank: int, alpha: float | None, cfg: RunConfig) -> dict[str, Any]:
    """Train one run; a run that raises or whose loss is not finite gives a row with its ``error`` instead."""
    try:
        summary = train(cfg)
    except Exception as exc:  # noqa: BLE001 - any failure of one run (NaN, CUDA out of memory, ...) is its row
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        gc.collect()  # free the failed run's model and optimizer for the next run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        bad = next((i for i, loss in enumerate(summary["losses"], 1) if not math.isfinite(loss)), None)
        if bad is None:
            return _row(rank, alpha, summary)
        error = f"the training loss is {summary['losses'][bad - 1]} at step {bad}"
    print(f"sweep: {_named(rank, alpha)} failed: {error}", file=sys.stderr, flush=True)
    return {"rank": rank, "alpha": alpha, "error": error, "save_dir": str(cfg.checkpoint.save_dir)}


def _row(rank: int, alpha: float | None, s: dict[str, Any]) -> dict[str, Any]:
    """One table row from a run's :func:`~peftkit.train.loop.train` summary."""
    norms = s["grad_norms"]
    return {
        "rank": rank,
        "alpha": alpha,
        "trainable": s["trainable"],
        "total": s["total"],
        "trainable_pct": 100 * s["trainable"] / s["total"],
        "first_loss": s["losses"][0],
        "last_loss": s["losses"][-1],
        "mean_grad_norm": sum(norms) / len(norms),
        "last_grad_norm": norms[-1],
        "seconds": s["seconds"],
        "losses": s["losses"],
        "grad_norms": norms,
    }


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss and gradient norm per step, one line per (rank, alpha): seed 002's comparison as a picture.

    Raises:
        MissingDependencyError: matplotlib is not installed (``pip install 'peftkit[plot]'``).
    """
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")  # type: ignore[attr-defined]
    plt = require("matplotlib.pyplot", "plot")
    fig, (loss_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 3.8))  # type: ignore[attr-defined]
    for row in (r for r in rows if "error" not in r):
        label = f"r={row['rank']}" + ("" if row["alpha"] is None else f" α={row['alpha']:g}")
        steps = range(1, len(row["losses"]) + 1)
        loss_ax.plot(steps, row["losses"], label=label)
        norm_ax.plot(steps, row["grad_norms"], label=label)
    for ax, title in ((loss_ax, "training loss"), (norm_ax, "gradient norm")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    norm_ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def format_table(rows: list[dict[str, Any]]) -> str:
    """The sweep results as a Markdown table."""

    def cell(key: str, value: Any) -> str:
        if key in ("trainable", "total"):
            return f"{value:,d}"
        if key == "alpha":  # as a failed run's row writes it: 16, 0.5
            return _alpha(value)
        if key == "trainable_pct":
            return f"{value:.4f}"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    def line(r: dict[str, Any]) -> str:
        if "error" in r:  # as compare's table: the run's keys, then why it failed
            return f"| {r['rank']} | {_alpha(r['alpha'])} | failed: {r['error'][:200]} |" + " |" * (len(COLUMNS) - 3)
        return "| " + " | ".join(cell(k, r[k]) for k in COLUMNS) + " |"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + [line(r) for r in rows])


def _check_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that would be ignored or would train twice into one run directory."""
    if args.alphas is not None and args.alpha_per_rank is not None:
        raise ConfigError("--alpha-per-rank is not used with --alphas (which sets every run's alpha); pass one of "
                          "them")
    for option, values in (("--ranks", [str(r) for r in args.ranks]),
                           ("--alphas", [f"{a:g}" for a in args.alphas or []])):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise ConfigError(f"{option} lists {twice} more than once, whose runs would train into the same "
                              "directory (r<rank>-a<alpha>); list each value once")


def _main(args: argparse.Namespace) -> int:
    _check_options(args)
    rows = run_sweep(args.config, args.ranks, args.alphas, args.alpha_per_rank, args.overrides)
    print(format_table(rows))
    failed = [r for r in rows if "error" in r]
    if not failed:
        return 0
    root = Path(failed[0]["save_dir"]).parent  # every run's directory is SAVE_DIR/r<rank>-a<alpha> (or r<rank>)
    names = ", ".join(_named(r["rank"], r["alpha"], sep=" ") for r in failed)
    print(f"peftkit sweep: {len(failed)} of {len(rows)} runs failed ({names}); their errors are in "
          f"{root / 'sweep.json'} and {root / 'sweep.md'}", file=sys.stderr)
    return 3  # "some runs failed": not 1, Python's status for a crash, nor 2, an error


def register(sub: Any) -> None:
    """Add ``peftkit sweep`` to the CLI."""
    p = sub.add_parser(
        "sweep",
        help="run a config over several LoRA ranks/alphas and tabulate",
        description="Train CONFIG (a LoRA-family method) once per rank and alpha, each run in "
        "SAVE_DIR/r<rank>-a<alpha> (SAVE_DIR: the config's checkpoint.save_dir; a method with a rank but no alpha, "
        "such as hra or miss, once per rank in SAVE_DIR/r<rank>), and print one table of parameter "
        "counts, loss and gradient norm; SAVE_DIR gets sweep.md, sweep.json and (logging.plots) sweep.png. A run "
        "that fails is a 'failed: ...' row and the others go on; the exit status is then 3.",
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32], help="ranks to run (default: 4 8 16 32)")
    p.add_argument("--alphas", type=float, nargs="+", help="alphas per rank (default: alpha-per-rank x rank)")
    p.add_argument("--alpha-per-rank", type=float, help="alpha / rank, without --alphas (default: 2)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    p.set_defaults(func=_main)
