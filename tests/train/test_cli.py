"""The ``peftkit`` commands end to end on tiny random-init models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.cli.main import build_parser, main

from .conftest import LLAMA, T5


def test_every_command_has_help(capsys):
    names = ["train", "eval", "inspect", "merge", "demo", "sweep", "compare", "combine", "prune"]
    for name in names:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: peftkit " + name in out
        parser = build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        undocumented = [a.dest for a in parser._actions if a.option_strings and not a.help]
        assert undocumented == [], f"peftkit {name}: options without a help text: {undocumented}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit status: 0 done; 1 a crash" in capsys.readouterr().out
    assert set(names) <= set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_train_eval_merge_end_to_end(run_config, tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("# peftkit train run.yaml\n" + yaml.safe_dump(run_config("causal_lm")))
    assert main(["train", str(cfg_path), "train.max_steps=3", "logging.plots=false"]) == 0
    out = capsys.readouterr().out
    assert "done: 3 steps" in out and "adapter:" in out
    run = Path(yaml.safe_load(cfg_path.read_text().split("\n", 1)[1])["checkpoint"]["save_dir"])

    assert main(["eval", "-p", str(run / "final"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"base", "adapted"} and {"loss", "ppl", "exact_match"} <= set(result["adapted"])
    assert result["base"]["loss"] != result["adapted"]["loss"]

    assert main(["eval", "-p", str(run / "step-3")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "base", "adapted"] and "ppl" in table

    merged = tmp_path / "merged"
    assert main(["merge", str(run / "final"), "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM

    import peftkit as pk
    from peftkit.train.commands import attach_checkpoint, checkpoint_config
    from peftkit.train.tasks import build_model

    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    cfg = checkpoint_config(run / "final")
    adapted = attach_checkpoint(build_model(cfg), run / "final", cfg)
    x = torch.tensor([[1, 50, 60, 70]])
    assert not pk.list_adapters(plain) if hasattr(pk, "list_adapters") else True
    torch.testing.assert_close(plain(x).logits, adapted.eval()(x).logits, rtol=1e-4, atol=1e-5)


def test_eval_errors_are_reported(tmp_path, capsys):
    assert main(["eval", "-p", str(tmp_path)]) == 2
    assert "not a peftkit checkpoint" in capsys.readouterr().err


def test_train_config_error_exit_code(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("checkpoint: {pretrained: x}\ntrain: {batch_size: 0}\n")
    assert main(["train", str(path)]) == 2
    assert "train.batch_size=0 is invalid" in capsys.readouterr().err


def test_inspect(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    assert main(["inspect", str(cfg)]) == 0
    assert "q_proj" in capsys.readouterr().out
    assert main(["inspect", str(cfg), "rank=4", "--method", "lora", "--target", "q_proj", "v_proj"]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "v_proj" in out and "k_proj" not in out


def test_sweep_table(run_config, tmp_path, capsys):
    cfg = run_config("seq2seq", train={"max_steps": 2}, checkpoint={"pretrained": {"config": dict(T5)}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(path), "data.eval_fraction=0", "logging.plots=true", "--ranks", "2", "4"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and "grad_norm" in lines[0]
    rows = json.loads((Path(cfg["checkpoint"]["save_dir"]) / "sweep.json").read_text())
    assert [r["alpha"] for r in rows] == [4.0, 8.0]
    assert rows[1]["trainable"] == 2 * rows[0]["trainable"]  # LoRA parameters grow linearly in rank
    assert all(len(r["losses"]) == len(r["grad_norms"]) == 2 for r in rows)
    png = Path(cfg["checkpoint"]["save_dir"]) / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("task", ["classification", "seq2seq"])
def test_eval_other_tasks(task, run_config, tmp_path, capsys):
    from peftkit.train.commands import evaluate_checkpoint

    cfg_path = tmp_path / "run.yaml"
    cfg = run_config(task, train={"max_steps": 6})
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 0
    result = evaluate_checkpoint(Path(cfg["checkpoint"]["save_dir"]) / "final")
    keys = {"loss", "accuracy", "f1"} if task == "classification" else {"loss", "ppl", "exact_match"}
    assert keys <= set(result["base"]) and keys <= set(result["adapted"])
    assert result["base"]["loss"] != result["adapted"]["loss"]


def test_overrides_may_follow_the_options(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    assert main(["inspect", str(cfg), "rank=4", "--target", "q_proj", "--method", "lora"]) == 0
    before = capsys.readouterr().out
    assert main(["inspect", str(cfg), "--target", "q_proj", "--method", "lora", "rank=4"]) == 0
    assert capsys.readouterr().out == before
    assert main(["inspect", str(cfg), "--target", "q_proj", "--method", "lora"]) == 0
    assert capsys.readouterr().out != before  # the default rank: the trailing override was not ignored
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(cfg), "--method", "lora", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_overrides_may_follow_an_option_taking_several_values(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    assert main(["inspect", str(cfg), "rank=4", "--method", "lora", "--target", "q_proj", "v_proj"]) == 0
    before = capsys.readouterr().out
    assert main(["inspect", str(cfg), "--method", "lora", "--target", "q_proj", "v_proj", "rank=4"]) == 0
    assert capsys.readouterr().out == before


def test_an_inspect_field_without_a_value_is_named(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    err = _error(["inspect", str(cfg), "rank", "--method", "lora"], capsys)
    assert err == "peftkit inspect: error: method field 'rank' has no value; write FIELD=VALUE, e.g. rank=16\n"


def test_a_removal_override_reaches_the_config_wherever_it_stands(run_config, tmp_path, monkeypatch, capsys):
    from peftkit.train import loop

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_config("causal_lm", train={"max_steps": 2})))
    seen = []
    monkeypatch.setattr(loop, "train", lambda config: seen.append(config) or 1 / 0)  # stop once the config is read
    with pytest.raises(ZeroDivisionError):
        main(["train", str(cfg), "~train.max_steps", "~peft.target_modules"])
    assert seen[0].train.max_steps == 0 and "target_modules" not in seen[0].peft.options
    # after an option taking several values, the word is an override, not one of the values
    err = _error(["sweep", str(cfg), "--ranks", "2", "4", "~train.max_step"], capsys)
    assert "unknown field train.max_step (did you mean train.max_steps?)" in err


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftkit {argv[0]}: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  pretrained: x\ntrain: {max_steps: 3\n")
    err = _error(["train", str(path)], capsys)
    assert repr(str(path)) in err and "not valid YAML at line 4" in err


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model_type": "lama"}, "model_type='lama' is unknown to transformers; did you mean 'llama'"),
        ({"hidden_size": 66}, "checkpoint.pretrained.config is rejected by transformers: "),
    ],
)
def test_model_configs_transformers_rejects_are_config_errors(tmp_path, capsys, fields, expected):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**LLAMA, **fields}))
    err = _error(["inspect", str(cfg)], capsys)
    assert expected in err and len(err) < 400
    if "hidden_size" in fields:
        assert "hidden size (66) is not a multiple of the number of attention heads (4)" in err


def test_classifier_rejected_when_built_is_a_config_error(run_config, tmp_path, capsys):
    cfg = run_config("classification")
    cfg["checkpoint"]["pretrained"]["config"]["hidden_size"] = 66  # BERT checks this only when built
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = _error(["train", str(path)], capsys)
    assert "checkpoint.pretrained.config is rejected by transformers: The hidden size (66)" in err


def test_a_run_without_training_data_says_so(run_config, tmp_path, capsys):
    cfg = run_config("causal_lm")
    del cfg["data"]["train"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "data.train is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("gpu0", "train.device='gpu0' is not a device name; allowed: auto, cpu, cuda"),
        ("meta", "train.device='meta' cannot be used on this machine (meta tensors hold no data)"),
        ("cuda:99", "train.device='cuda:99' cannot be used on this machine ("),
    ],
)
def test_a_device_the_machine_lacks_is_a_config_error_before_resuming(run_config, tmp_path, capsys, device, expected):
    cfg = run_config("causal_lm", train={"max_steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    run = Path(cfg["checkpoint"]["save_dir"])
    saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    err = _error(["train", str(path), "train.max_steps=4", f"train.device={device}"], capsys)
    assert expected in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved
    assert expected in _error(["eval", "-p", str(run / "final"), f"train.device={device}"], capsys)


def test_ctrl_c_mid_run_is_one_line_and_the_run_resumes(run_config, tmp_path, capsys, monkeypatch):
    from peftkit.train import loop

    cfg = run_config("causal_lm", train={"max_steps": 4}, checkpoint={"save_interval": 2, "resume": "auto"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    real = loop.train_step

    def interrupted(run, step, params):
        if step == 3:
            raise KeyboardInterrupt
        return real(run, step, params)

    monkeypatch.setattr(loop, "train_step", interrupted)
    assert main(["train", str(path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit train: interrupted;") and "checkpoint.resume=auto" in err and "Traceback" not in err
    monkeypatch.setattr(loop, "train_step", real)
    assert main(["train", str(path)]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tmp_path, monkeypatch):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    read, write = os.pipe()
    os.close(read)  # the reader is gone, as after `| head -1`
    stdout = os.fdopen(write, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", stdout)
    try:
        assert main(["inspect", str(cfg)]) == 141
        stdout.write("more\n")  # what Python would flush at exit now goes nowhere, without an error
    finally:
        stdout.close()


def test_train_with_comma_separated_target_modules_says_to_write_a_list(run_config, tmp_path, capsys):
    cfg = run_config("causal_lm")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "peft.target_modules=q_proj,v_proj"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit train: error: target pattern 'q_proj,v_proj' matches no module")
    assert err.endswith("write a list, e.g. peft.target_modules=[q_proj,v_proj] on the command line or "
                        "target_modules=['q_proj', 'v_proj'] in Python.\n")
    assert not (Path(cfg["checkpoint"]["save_dir"]) / "final").exists()
