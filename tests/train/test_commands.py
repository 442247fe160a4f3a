"""``peftkit.train.commands``: inspect, eval and merge of checkpoints as plain functions."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from peftkit.cli.main import main
from peftkit.train.commands import evaluate_checkpoint, inspect_model, merge_checkpoint
from peftkit.train.config import config_from_dict
from peftkit.train.loop import train
from peftkit.train.metrics import read_metrics

from .conftest import BERT


def test_inspect_reads_only_the_config_of_a_7b_model(tmp_path):
    from transformers import LlamaConfig

    model_dir = tmp_path / "llama7b"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"not read: inspect needs no weights")
    t0 = time.perf_counter()
    report = inspect_model(str(model_dir), method="lora", options={"rank": 8, "target_modules": ["q_proj", "v_proj"]})
    assert "64 modules adapted, 4,194,304 parameters added" in report
    assert "of 6,742,609,920" in report  # Llama-2-7B's 6,738,415,616 plus the adapter
    listing = inspect_model(str(model_dir))
    assert listing.startswith("LlamaForCausalLM: 6,738,415,616 parameters") and "q_proj" in listing
    assert time.perf_counter() - t0 < 60


def test_inspect_lists_the_expert_stacks_target_parameters_reaches(tmp_path):
    from transformers import MixtralConfig

    MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, vocab_size=64).save_pretrained(str(tmp_path))
    listing = inspect_model(str(tmp_path))
    assert listing.endswith("expert stacks (target_parameters) by name:\n"
                            "  experts.down_proj        x2  (4, 32, 64)\n"
                            "  experts.gate_up_proj     x2  (4, 128, 32)")
    report = inspect_model(str(tmp_path), method="lora", options={"target_parameters": ["experts.down_proj"]})
    assert "2 modules adapted" in report and "model.layers.1.mlp.experts.down_proj" in report


def _train(cfg: dict[str, Any]) -> Path:
    train(config_from_dict(cfg))
    return Path(cfg["checkpoint"]["save_dir"])


def test_eval_of_a_pretrained_encoder_with_a_new_head_is_repeatable(run_config, tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = tmp_path / "bert"
    BertModel(BertConfig(**{k: v for k, v in BERT.items() if k != "model_type"})).save_pretrained(str(encoder))
    cfg = run_config("classification", checkpoint={"pretrained": str(encoder)}, train={"max_steps": 2})
    run = _train(cfg)
    first = evaluate_checkpoint(run / "final")
    torch.manual_seed(123)  # whatever the caller did to the global RNG in between
    assert evaluate_checkpoint(run / "final") == first


def test_a_checkpoint_of_a_run_with_relative_paths_evaluates_from_anywhere(run_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = run_config("classification", train={"max_steps": 2}, checkpoint={"save_interval": 2})
    cfg["data"]["train"] = "classification.jsonl"  # written into tmp_path by run_config
    run = _train(cfg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for ckpt in ("final", "step-2"):
        saved = yaml.safe_load((run / ckpt / "run_config.yaml").read_text())
        assert saved["data"]["train"] == str(tmp_path / "classification.jsonl")
        assert set(evaluate_checkpoint(run / ckpt)) == {"base", "adapted"}


def test_eval_names_a_missing_data_file(run_config, tmp_path, capsys):
    run = _train(run_config("classification", train={"max_steps": 1}))
    assert main(["eval", "-p", str(run / "final"), "--data", "nope.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "--data 'nope.jsonl' does not exist" in err and "data.train" not in err


def _eval_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]


def test_metrics_hold_one_eval_record_per_step_even_when_a_finished_run_is_rerun(run_config):
    cfg = run_config(train={"max_steps": 6}, eval={"interval": 3})
    first = train(config_from_dict(cfg))
    run = Path(cfg["checkpoint"]["save_dir"])
    assert _eval_steps(run) == [3, 6]
    lines = (run / "metrics.jsonl").read_text()
    again = train(config_from_dict({**cfg, "checkpoint": {**cfg["checkpoint"], "resume": "auto"}}))
    assert (run / "metrics.jsonl").read_text() == lines
    assert again["eval"] == first["eval"] and again["steps"] == 6


@pytest.mark.parametrize(("labels", "expected"), [(["pos", "neg"], ["pos", "neg"]), ([], ["neg", "pos"])])
def test_merged_classifier_keeps_the_label_names(run_config, tmp_path, labels, expected):
    from transformers import AutoConfig

    run = _train(run_config("classification", train={"max_steps": 1}, data={"labels": labels}))
    for ckpt in ("final", "step-1"):
        merged = merge_checkpoint(run / ckpt, tmp_path / f"merged-{ckpt}")
        config = AutoConfig.from_pretrained(str(merged))
        assert config.id2label == dict(enumerate(expected))
        assert config.label2id == {name: i for i, name in enumerate(expected)}


def test_a_layer_replication_run_merges_into_a_plain_model_of_the_new_depth(run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    import peftkit as pk
    from peftkit.train.commands import checkpoint_config
    from peftkit.train.tasks import build_model

    run = _train(run_config(peft={"layer_replication": [[0, 2], [1, 2]]}, train={"max_steps": 2}))
    merged = AutoModelForCausalLM.from_pretrained(str(merge_checkpoint(run / "final", tmp_path / "merged"))).eval()
    adapted = pk.load_adapter(build_model(checkpoint_config(run / "final")), run / "final").eval()
    assert merged.config.num_hidden_layers == 3
    ids = torch.arange(3, 30).reshape(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)


def test_eval_shows_progress_per_model_as_training_does(run_config, capsys):
    cfg = run_config("causal_lm", train={"max_steps": 2}, eval={"max_batches": 2, "batch_size": 2})
    summary = train(config_from_dict(cfg))
    capsys.readouterr()
    evaluate_checkpoint(summary["adapter"], overrides=["logging.progress_bar=true"])
    err = capsys.readouterr().err
    for label, total in (("eval base", 2), ("eval adapted", 2), ("eval base (answers)", 4),
                         ("eval adapted (answers)", 4)):  # eval.max_batches × batch_size answers
        assert re.search(re.escape(label) + rf":\s+0%\|[^|]*\| 0/{total} ", err), label
    evaluate_checkpoint(summary["adapter"])  # the run's own logging.progress_bar=false
    assert "eval base" not in capsys.readouterr().err


def test_merge_replaces_its_output_whole_and_a_failed_merge_keeps_the_previous(run_config, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    run = _train(run_config(train={"max_steps": 1}))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier, sharded export
    (out / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    merge_checkpoint(run / "final", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors" in before and "model-00001-of-00002.safetensors" not in before

    def killed(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(run / "final", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merge_into_a_directory_it_would_wipe_is_refused(run_config, tmp_path):
    from peftkit.errors import ConfigError

    run = _train(run_config(train={"max_steps": 1}))
    with pytest.raises(ConfigError, match=r"--out '.*run' holds the checkpoint, the base model or the working "
                                          r"directory, and is replaced whole"):
        merge_checkpoint(run / "final", run)
    assert (run / "final" / "adapter_model.safetensors").is_file()
    mine = tmp_path / "models"
    (mine / "other-model").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"--out '.*models' holds files but no model \(config.json\)"):
        merge_checkpoint(run / "final", mine)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "other-model").is_dir()


def test_merge_removes_the_partial_copies_a_killed_merge_left_beside_its_output(run_config, tmp_path, capsys):
    run = _train(run_config(train={"max_steps": 1}))
    out = tmp_path / "merged"
    torn = tmp_path / ".tmp-merged-0123abcd"  # a merge killed mid-write
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"torn")
    other = tmp_path / ".tmp-other-0123abcd"  # another directory's: left alone
    other.mkdir()
    merge_checkpoint(run / "final", out)
    assert not torn.exists() and other.exists() and (out / "config.json").is_file()
    assert "removed 1 partial copy(ies)" in capsys.readouterr().out


def test_a_merge_of_a_damaged_checkpoint_leaves_no_empty_out_dir(run_config, tmp_path):
    from peftkit.errors import PeftkitError

    run = _train(run_config(train={"max_steps": 1}))
    weights = run / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PeftkitError, match="adapter_model.safetensors"):
        merge_checkpoint(run / "final", tmp_path / "out" / "merged")
    assert not (tmp_path / "out").exists()
