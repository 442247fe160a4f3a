"""``peftkit sweep``: a failed run is a row of the table, and finished results are on disk after every run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peftkit.cli.main import main
from peftkit.train import sweep


@pytest.fixture
def sweep_file(run_config: Any, tmp_path: Path) -> tuple[Path, Path]:
    cfg = run_config("causal_lm", train={"max_steps": 2}, data={"eval_fraction": 0})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Path(cfg["checkpoint"]["save_dir"])


def _failing(monkeypatch: pytest.MonkeyPatch, fail: Any) -> None:
    """Make the run of rank 4 fail with ``fail(cfg, summary_of_a_real_run)``."""
    real = sweep.train

    def train(cfg: Any) -> dict[str, Any]:
        return fail(cfg, real(cfg)) if cfg.peft.options["rank"] == 4 else real(cfg)

    monkeypatch.setattr(sweep, "train", train)


def test_a_run_that_raises_is_an_error_row_and_the_sweep_goes_on(sweep_file, monkeypatch, capsys):
    def out_of_memory(cfg: Any, summary: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _failing(monkeypatch, out_of_memory)
    path, root = sweep_file
    assert main(["sweep", str(path), "--ranks", "2", "4", "8"]) == 3  # a script can tell that a run failed
    captured = capsys.readouterr()
    assert "sweep: rank 4, alpha 8 failed: OutOfMemoryError: CUDA out of memory" in captured.err
    assert captured.err.splitlines()[-1] == (f"peftkit sweep: 1 of 3 runs failed (rank 4 alpha 8); their errors are "
                                             f"in {root / 'sweep.json'} and {root / 'sweep.md'}")
    assert "| 8 | 16 |" in captured.out  # the table of every run is printed all the same
    rows = json.loads((root / "sweep.json").read_text())
    assert [r["rank"] for r in rows] == [2, 4, 8]
    assert rows[1] == {"rank": 4, "alpha": 8.0, "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate "
                       "2.00 GiB", "save_dir": str(root / "r4-a8")}
    assert rows[2]["trainable"] == 4 * rows[0]["trainable"]
    table = (root / "sweep.md").read_text().splitlines()
    assert table[3].startswith("| 4 | 8 | failed: OutOfMemoryError: CUDA out of memory")
    assert table[3].count("|") == table[2].count("|")  # as many cells as a finished run's row


def test_a_run_whose_loss_is_not_finite_is_an_error_row(sweep_file, monkeypatch):
    def diverged(cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
        return {**summary, "losses": [summary["losses"][0], math.nan]}

    _failing(monkeypatch, diverged)
    path, root = sweep_file
    rows = sweep.run_sweep(str(path), [2, 4])
    assert rows[1]["error"] == "the training loss is nan at step 2" and "last_loss" not in rows[1]
    assert "| 4 | 8 | failed: the training loss is nan at step 2 |" in (root / "sweep.md").read_text()


def test_results_of_finished_runs_are_on_disk_when_a_later_run_kills_the_sweep(sweep_file, monkeypatch):
    def killed(cfg: Any, summary: Any) -> Any:
        raise KeyboardInterrupt

    _failing(monkeypatch, killed)
    path, root = sweep_file
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(str(path), [2, 4])
    rows = json.loads((root / "sweep.json").read_text())
    assert [r["rank"] for r in rows] == [2] and len(rows[0]["losses"]) == 2
    assert len((root / "sweep.md").read_text().splitlines()) == 3


@pytest.mark.parametrize(("options", "message"), [
    (["--alphas", "8", "--alpha-per-rank", "4"],
     "--alpha-per-rank is not used with --alphas (which sets every run's alpha); pass one of them"),
    (["--ranks", "2", "4", "2"], "--ranks lists 2 more than once, whose runs would train into the same directory "
     "(r<rank>-a<alpha>); list each value once"),
    (["--alphas", "1", "1.0"], "--alphas lists 1 more than once, whose runs would train into the same directory "
     "(r<rank>-a<alpha>); list each value once"),
])
def test_ignored_or_duplicate_options_are_refused_before_any_run(options, message, sweep_file, monkeypatch, capsys):
    def train(cfg: Any) -> Any:
        raise AssertionError("no run trains")

    monkeypatch.setattr(sweep, "train", train)
    path, root = sweep_file
    assert main(["sweep", str(path), *options]) == 2
    assert capsys.readouterr().err == f"peftkit sweep: error: {message}\n"
    assert not root.exists()


def test_a_missing_data_file_is_one_error_before_any_run(sweep_file, tmp_path, monkeypatch, capsys):
    """Every run reads the same data: the sweep refuses a missing file once, and writes nothing."""
    def train(cfg: Any) -> Any:
        raise AssertionError("no run trains")

    monkeypatch.setattr(sweep, "train", train)
    path, root = sweep_file
    missing = tmp_path / "gone.jsonl"
    assert main(["sweep", str(path), f"data.train={missing}", "--ranks", "2", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit sweep: error: data file '{missing}' does not exist") and err.count("\n") == 1
    assert not root.exists()
