"""Paths the commands are given and invalid runs: refused by name, before any training or writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from peftkit.cli.main import main
from peftkit.train import compare, loop, sweep


def _error(argv: list[str], capsys: Any) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit {argv[0]}: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "setup", refuse)
    monkeypatch.setattr(sweep, "train", refuse)
    monkeypatch.setattr(compare, "run_one", refuse)
    monkeypatch.setattr(compare, "_run_isolated", refuse)


@pytest.fixture
def config_file(run_config: Any, tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config("causal_lm", train={"max_steps": 2})))
    return path


@pytest.mark.parametrize("command", ["train", "sweep", "compare"])
def test_an_output_path_that_is_a_file_is_refused_before_training(command, config_file, tmp_path, monkeypatch,
                                                                  capsys):
    _no_training(monkeypatch)
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    argv = {
        "train": ["train", str(config_file), f"checkpoint.save_dir={taken}"],
        "sweep": ["sweep", str(config_file), "--ranks", "2", f"checkpoint.save_dir={taken}"],
        "compare": ["compare", str(config_file), "--methods", "lora", "--out", str(taken)],
    }[command]
    name = "--out" if command == "compare" else "checkpoint.save_dir"
    err = _error(argv, capsys)
    assert f"{name}={str(taken)!r} is a file, not a directory" in err
    assert taken.read_text() == "mine"


def test_an_output_directory_that_cannot_be_created_is_a_config_error(config_file, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(["train", str(config_file), f"checkpoint.save_dir={blocker / 'run'}"], capsys)
    assert f"checkpoint.save_dir={str(blocker / 'run')!r} cannot be created" in err and "writable directory" in err


def test_a_sweep_checks_every_rank_before_training_the_first(config_file, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    save_dir = tmp_path / "sweep"
    err = _error(["sweep", str(config_file), "--ranks", "2", "4", "0", f"checkpoint.save_dir={save_dir}"], capsys)
    assert "rank=0 must be a positive integer" in err
    assert not save_dir.exists()


def test_compare_checks_each_methods_fields_before_training(config_file, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    out = tmp_path / "compare"
    err = _error(["compare", str(config_file), "--methods", "ia3,lora", "--out", str(out), "peft.rank=0"], capsys)
    assert "rank=0 must be a positive integer" in err
    assert not out.exists()


def test_merge_refuses_a_file_or_the_checkpoint_itself_as_output(config_file, tmp_path, capsys):
    assert main(["train", str(config_file)]) == 0
    final = Path(yaml.safe_load(config_file.read_text())["checkpoint"]["save_dir"]) / "final"
    before = sorted(p.name for p in final.iterdir())
    err = _error(["merge", str(final), "--out", str(final) + "/"], capsys)
    assert "is the checkpoint itself" in err
    assert sorted(p.name for p in final.iterdir()) == before  # no model files mixed into the adapter
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    err = _error(["merge", str(final), "--out", str(taken)], capsys)
    assert f"--out={str(taken)!r} is a file, not a directory" in err and taken.read_text() == "mine"


def test_a_sweep_of_a_method_without_rank_says_so_and_trains_nothing(run_config, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    cfg = run_config("causal_lm")
    cfg["peft"] = {"method": "ia3", "target_modules": ["k_proj", "v_proj"]}
    path = tmp_path / "ia3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = _error(["sweep", str(path), "--ranks", "2"], capsys)
    assert "peft.method='ia3' has no rank to sweep; use a method with one (lora, canonical_lora, dora, loha" in err
    monkeypatch.undo()
    err = _error(["train", str(path), "peft.rank=4"], capsys)  # a LoRA field left in another method's section
    assert "'rank' is not a field" in err
    assert "remove those fields from the config's peft section (on the command line: ~peft.rank) to use" in err
    assert main(["train", str(path), "peft.rank=4", "~peft.rank", "train.max_steps=1"]) == 0  # as it says


def test_a_sweep_names_each_run_as_it_starts(config_file, tmp_path, capsys):
    save_dir = tmp_path / "sweep"
    assert main(["sweep", str(config_file), "--ranks", "2", "3", f"checkpoint.save_dir={save_dir}",
                 "logging.plots=false"]) == 0
    out = capsys.readouterr().out
    assert f"sweep: training rank 2, alpha 4 (1/2) in {save_dir}/r2-a4" in out
    assert f"sweep: training rank 3, alpha 6 (2/2) in {save_dir}/r3-a6" in out
    assert (save_dir / "sweep.md").read_text().count("\n| ") == 2


@pytest.mark.parametrize("model", ["missing", "data.jsonl"])
def test_inspect_names_its_model_argument(model, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text("{}\n")
    path = str(tmp_path / model)
    err = _error(["inspect", path, "--method", "lora"], capsys)
    assert f"MODEL {path!r} is not a local model directory or config.json" in err and "checkpoint." not in err
