"""A few steps per task with the loss going down; checkpoints, resume == uninterrupted, crash safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftkit.train import checkpoint as ckpt
from peftkit.train.config import config_from_dict
from peftkit.train.loop import FAULT_ENV, train


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", "classification"])
def test_loss_goes_down_per_task(task, run_config):
    summary = train(config_from_dict(run_config(task, train={"max_steps": 12})))
    losses = summary["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(g > 0 for g in summary["grad_norms"])
    key = "accuracy" if task == "classification" else "ppl"
    assert key in summary["eval"]
    if task != "classification":
        assert "exact_match" in summary["eval"]
    final = Path(summary["adapter"])
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_grad_accum_checkpointing_and_metrics(run_config):
    cfg = run_config(
        train={"max_steps": 3, "grad_accum": 2, "max_grad_norm": 0.5},
        model={"gradient_checkpointing": True},
        logging={"plots": True, "log_interval": 1},
        scheduler={"name": "cosine", "warmup_steps": 1},
    )
    summary = train(config_from_dict(cfg))
    out = Path(cfg["checkpoint"]["save_dir"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[0]["lr"] == 0.0
    assert all({"grad_norm", "lr", "tokens"} <= set(r) for r in steps)
    assert any("eval_loss" in r for r in records)
    assert {p.name for p in out.glob("*.png")} == {"loss.png", "lr.png", "grad_norm.png"}
    assert summary["steps"] == 3


def test_bf16_autocast(run_config):
    summary = train(config_from_dict(run_config(train={"max_steps": 2, "precision": "bf16"})))
    assert len(summary["losses"]) == 2 and all(x == x for x in summary["losses"])


def _run_cli(cfg_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_killed_and_resumed_run_matches_uninterrupted(run_config, tmp_path):
    cfg = run_config(
        checkpoint={"save_interval": 2, "keep_last": 2},
        peft={"dropout": 0.1},
        train={"max_steps": 7, "grad_accum": 2, "batch_size": 3},
        optimizer={"loraplus_ratio": 4.0},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full = _run_cli(path, f"checkpoint.save_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    killed = _run_cli(path, f"checkpoint.save_dir={tmp_path / 'cut'}", env={FAULT_ENV: "5"})
    assert killed.returncode != 0  # SIGKILLed after step 5: the last checkpoint is step-4
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step-2", "step-4"]
    resumed = _run_cli(path, f"checkpoint.save_dir={tmp_path / 'cut'}", "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-4" in resumed.stdout

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert losses("full") == losses("cut") and len(losses("full")) == 7
    a = load_file(str(tmp_path / "full/final/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut/final/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "cut")] == ["step-6", "step-7"]  # keep_last=2


def test_crash_mid_write_leaves_previous_checkpoints(run_config, tmp_path, monkeypatch):
    cfg = config_from_dict(run_config(checkpoint={"save_interval": 2}, train={"max_steps": 4}))
    calls = {"n": 0}
    real = ckpt._write_contents

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint dies half-way through
            real(*args, **kwargs)
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "_write_contents", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    root = Path(cfg.checkpoint.save_dir)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2"]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    assert ckpt.resolve_resume("auto", root) == root / "step-2"
    # A torn directory without trainer_state.json (e.g. power loss before rename) is never picked up.
    (root / "step-9").mkdir()
    assert ckpt.resolve_resume("auto", root) == root / "step-2"
    with pytest.raises(Exception, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step-9"), root)


def test_checkpoint_has_no_pickles_and_adapter_loads_alone(run_config):
    import peftkit as pk
    from peftkit.train.tasks import build_model

    cfg = config_from_dict(run_config(train={"max_steps": 2}))
    summary = train(cfg)
    d = Path(summary["checkpoint"])
    assert not [p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    model = build_model(cfg)
    pk.load_adapter(model, d)
    trained = load_file(str(d / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in trained.items())


def test_lisa_run_resumed_between_resamplings_matches_uninterrupted(run_config, tmp_path):
    # Killed after step 5, resumed from step-4: steps 4 and 5 lie inside the sampling window that began at step
    # 3, so the resumed run must train that window's layers (and only those), not every layer until step 6.
    cfg = run_config(
        peft={"method": "none"},
        checkpoint={"save_interval": 2, "keep_last": 1},
        train={"max_steps": 6},
        optimizer={"lisa_layers": 1, "lisa_interval": 3, "lr": 0.01},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full = _run_cli(path, f"checkpoint.save_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    assert _run_cli(path, f"checkpoint.save_dir={tmp_path / 'cut'}", env={FAULT_ENV: "5"}).returncode != 0
    resumed = _run_cli(path, f"checkpoint.save_dir={tmp_path / 'cut'}", "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "step-4" in resumed.stdout

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert losses("full") == losses("cut") and len(losses("full")) == 6


def test_lisa_and_galore_runs(run_config):
    lisa = train(
        config_from_dict(
            run_config(
                peft={"method": "none"},
                train={"max_steps": 4},
                optimizer={"lisa_layers": 1, "lisa_interval": 2, "lr": 0.001},
            )
        )
    )
    assert len(lisa["losses"]) == 4
    galore = train(
        config_from_dict(
            run_config(
                peft={"method": "none"},
                train={"max_steps": 4},
                optimizer={"name": "galore", "galore_rank": 4, "lr": 0.001},
            )
        )
    )
    assert galore["losses"][-1] < galore["losses"][0]


def test_adalora_hook_called_every_step(run_config, monkeypatch):
    import peftkit as pk

    if not hasattr(pk, "AdaLoRA"):
        pytest.skip("peftkit.AdaLoRA not available")
    calls: list[int] = []
    real = pk.adalora_step
    monkeypatch.setattr(pk, "adalora_step", lambda model, step: (calls.append(step), real(model, step)))
    cfg = run_config(
        peft={"method": "adalora", "init_rank": 4, "target_rank": 2, "total_step": 4, "tinit": 1, "tfinal": 1},
        train={"max_steps": 4},
    )
    cfg["peft"].pop("rank")
    cfg["peft"].pop("alpha")
    summary = train(config_from_dict(cfg))
    assert calls == [0, 1, 2, 3] and len(summary["losses"]) == 4


def test_trainable_tokens_run_trains_only_its_rows(run_config):
    cfg = run_config(train={"max_steps": 3})
    cfg["peft"] = {"method": "trainable_tokens", "token_indices": [3, 5, 7]}
    summary = train(config_from_dict(cfg))
    saved = load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors"))
    assert json.loads((Path(summary["adapter"]) / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    (key,) = [k for k in saved if k.endswith("embed_tokens.trainable_tokens_delta")]
    assert saved[key].shape[0] == 3 and summary["trainable"] == saved[key].numel()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"peft": {"rank": 8}}, "_A.default.weight' of shape (4, 32) does not fit the model (the model's is (8, 32"),
        ({"peft": {"method": "dora"}}, "has no tensor for 'model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
        ({"optimizer": {"loraplus_ratio": 16}}, "the optimizer state belongs to another run"),
    ],
)
def test_resuming_another_runs_checkpoint_is_refused_and_leaves_it_intact(run_config, change, expected):
    from peftkit.errors import CheckpointError

    first = run_config(train={"max_steps": 2})
    train(config_from_dict(first))
    root = Path(first["checkpoint"]["save_dir"])
    saved = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    other = run_config(train={"max_steps": 4}, **change)
    other["checkpoint"]["resume"] = "auto"
    with pytest.raises(CheckpointError) as info:
        train(config_from_dict(other))
    assert expected in str(info.value) and "start afresh in another checkpoint.save_dir" in str(info.value)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == saved


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("trainable.safetensors", "truncate", "(trainable.safetensors: "),
        ("optimizer.safetensors", "truncate", "(optimizer.safetensors: "),
        ("rng.safetensors", "truncate", "(rng.safetensors: "),
        ("optimizer.json", "truncate", "(optimizer.json: "),
        ("optimizer.json", "remove", "No such file or directory"),
        ("trainer_state.json", "no_rng", "(trainer_state.json has no 'python_rng' entry)"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(run_config, name, damage, expected):
    from peftkit.errors import CheckpointError

    first = run_config(train={"max_steps": 2}, checkpoint={"save_interval": 2})
    train(config_from_dict(first))
    path = Path(first["checkpoint"]["save_dir"]) / "step-2" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "remove":
        path.unlink()
    else:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "python_rng"}))
    resumed = config_from_dict(run_config(train={"max_steps": 4}, checkpoint={"resume": "auto"}))
    with pytest.raises(CheckpointError) as info:
        train(resumed)
    message = str(info.value)
    assert "step-2' is incomplete or corrupt" in message and expected in message
    assert "checkpoint.resume=PATH" in message


def test_partial_checkpoints_a_killed_save_left_are_removed_when_the_run_restarts(run_config, capsys):
    cfg = run_config(train={"max_steps": 2}, checkpoint={"resume": "auto"})
    root = Path(cfg["checkpoint"]["save_dir"])
    stale = [root / ".tmp-step-4-0123abcd", root / ".old-step-2-deadbeef"]  # as staged() and publish() name them
    kept = [root / ".tmp-notes", root / "step-x-0123abcd"]
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "trainable.safetensors").write_bytes(b"partial")
    train(config_from_dict(cfg))
    assert f"removed 2 partial checkpoint(s) an interrupted save left in {root}" in capsys.readouterr().out
    assert not any(d.exists() for d in stale) and all((d / "trainable.safetensors").is_file() for d in kept)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2"]


def test_resuming_a_checkpoint_past_the_runs_end_is_refused(run_config):
    from peftkit.errors import CheckpointError

    cfg = run_config(train={"max_steps": 4}, checkpoint={"save_interval": 2, "resume": "auto"})
    train(config_from_dict(cfg))
    root = Path(cfg["checkpoint"]["save_dir"])
    final = {p.name: p.read_bytes() for p in (root / "final").iterdir()}
    cfg["train"]["max_steps"] = 3
    with pytest.raises(CheckpointError, match=r"step-4' is at step 4, past the end of this run \(3 steps\); "
                                              r"set train.max_steps=4 or more"):
        train(config_from_dict(cfg))
    assert {p.name: p.read_bytes() for p in (root / "final").iterdir()} == final
    cfg["train"]["max_steps"] = 4  # the same length: nothing to train, the summary covers the 4 steps
    assert train(config_from_dict(cfg))["steps"] == 4


def test_resuming_with_other_settings_warns_naming_them(run_config, capsys):
    cfg = run_config(train={"max_steps": 4}, checkpoint={"save_interval": 2, "resume": "auto"})
    train(config_from_dict({**cfg, "train": {**cfg["train"], "max_steps": 2}}))
    capsys.readouterr()
    changed = {**cfg, "train": {**cfg["train"], "seed": 5}, "logging": {**cfg["logging"], "log_interval": 3}}
    train(config_from_dict(changed))
    err = capsys.readouterr().err
    assert "with settings other than those it was written with (train.max_steps: 2 -> 4; train.seed: 0 -> 5)" in err
    assert "log_interval" not in err  # reporting settings do not change the run
    first = run_config(train={"max_steps": 4}, checkpoint={"save_interval": 2, "resume": "auto",
                                                           "save_dir": cfg["checkpoint"]["save_dir"] + "-same"})
    train(config_from_dict(first))
    for step in ckpt.list_checkpoints(first["checkpoint"]["save_dir"])[1:]:
        shutil.rmtree(step)  # as if killed after step 2: resumed with the same settings
    capsys.readouterr()
    train(config_from_dict(first))
    out = capsys.readouterr()
    assert "resumed from" in out.out and "warning" not in out.err


def test_final_of_an_earlier_run_with_another_method_is_replaced_whole(run_config):
    cfg = run_config(train={"max_steps": 2}, peft={"method": "none", "modules_to_save": None, "target_modules": None},
                     checkpoint={"resume": "none"})
    train(config_from_dict(cfg))
    final = Path(cfg["checkpoint"]["save_dir"]) / "final"
    assert (final / "trainable.safetensors").is_file()
    train(config_from_dict(run_config(train={"max_steps": 2}, checkpoint={"resume": "none"})))
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "run_config.yaml"]


def test_an_interrupted_final_save_leaves_the_previous_final_whole(run_config, monkeypatch):
    from peftkit.train import loop

    cfg = run_config(train={"max_steps": 2}, checkpoint={"resume": "none"})
    train(config_from_dict(cfg))
    root = Path(cfg["checkpoint"]["save_dir"])
    before = {p.name: p.read_bytes() for p in (root / "final").iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "dump_config", killed)  # the last file of final/ is being written
    cfg["train"]["seed"] = 1
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(cfg))
    assert {p.name: p.read_bytes() for p in (root / "final").iterdir()} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_previous_final_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    old = tmp_path / ".old-final-0123abcd"
    old.mkdir()
    (old / "run_config.yaml").write_text("model: {}\n")
    partial = tmp_path / ".old-step-2-0123abcd"  # no trainer_state.json: never complete
    partial.mkdir()
    assert ckpt.remove_stale(tmp_path) == 1
    assert (tmp_path / "final" / "run_config.yaml").read_text() == "model: {}\n" and not partial.exists()


def test_a_publish_killed_between_its_renames_leaves_the_previous_checkpoint_to_put_back(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "run_config.yaml").write_text("old\n")
    new = tmp_path / ".tmp-final-0123abcd"
    new.mkdir()
    (new / "run_config.yaml").write_text("new\n")
    real_replace, calls = os.replace, []

    def killed_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new checkpoint's rename into place never happens
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish(new, final, keep_last=0, token="0123abcd")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not final.exists()
    assert ckpt.remove_stale(tmp_path) == 1  # the partial new one goes, the complete old one comes back
    assert (final / "run_config.yaml").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_run_failing_on_its_data_leaves_no_empty_save_dir(run_config, tmp_path):
    """The save_dir (and the parents the run created for it) go again when the run fails before writing there;
    an existing directory stays."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "b", "output": "c"}\n{"instruction": \n', encoding="utf-8")
    save_dir = tmp_path / "runs" / "new" / "run"
    cfg = run_config(data={"train": str(bad)}, checkpoint={"save_dir": str(save_dir)})
    with pytest.raises(Exception, match="bad.jsonl"):
        train(config_from_dict(cfg))
    assert not (tmp_path / "runs").exists()
    save_dir.mkdir(parents=True)
    (save_dir / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(Exception, match="bad.jsonl"):
        train(config_from_dict(cfg))
    assert (save_dir / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_data_whose_responses_all_lie_past_max_length_is_refused(run_config, tmp_path):
    """Every response cut off by data.max_length: the loss would be NaN at every step; refused before training,
    naming the field, and nothing is left in save_dir."""
    from peftkit.errors import ConfigError

    cfg = run_config(data={"max_length": 3})
    with pytest.raises(ConfigError, match=r"keeps a response token within data.max_length=3 .*raise data.max_length"):
        train(config_from_dict(cfg))
    assert not Path(cfg["checkpoint"]["save_dir"]).exists()
