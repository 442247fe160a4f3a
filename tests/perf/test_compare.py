"""``peftkit compare``: per-method configs, the table, the JSON and the plots of a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from peftkit.cli.main import main
from peftkit.errors import ConfigError
from peftkit.train.compare import compare, markdown_table, method_config, register
from peftkit.train.config import config_from_dict

TINY = {"model_type": "llama", "vocab_size": 260, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}


def _config(tmp_path: Path) -> dict:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 4}) + "\n" for i in range(16)))
    return {"checkpoint": {"pretrained": {"config": TINY}, "save_dir": str(tmp_path / "ignored")},
            "peft": {"method": "lora", "rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(data), "format": "text", "max_length": 16, "eval_fraction": 0.25},
            "train": {"max_steps": 2, "batch_size": 4, "seed": 0},
            "logging": {"progress_bar": False, "tensorboard": "false"}}


def test_method_configs_keep_the_run_and_pass_on_only_accepted_options(tmp_path: Path) -> None:
    base = config_from_dict(_config(tmp_path))
    dora = method_config(base, "dora", tmp_path)
    assert dora.peft.method == "dora" and dora.peft.options["rank"] == 2
    assert dora.checkpoint.save_dir == str(tmp_path / "dora") and dora.train == base.train
    ia3 = method_config(base, "ia3", tmp_path)
    assert "rank" not in ia3.peft.options and ia3.peft.options["target_modules"] == ["q_proj", "v_proj"]
    full = method_config(base, "full", tmp_path)
    assert full.peft.method == "none" and full.peft.options == {}
    with pytest.raises(ConfigError, match=r"unknown method 'lorra' in --methods \(did you mean 'lora'\?\); choose"):
        method_config(base, "lorra", tmp_path)
    bitfit = method_config(base, "bitfit", tmp_path)  # LoRA's targets would mean "train these layers' biases"
    assert "target_modules" not in bitfit.peft.options


def test_adalora_takes_its_schedule_length_from_the_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    adalora = method_config(config_from_dict(cfg), "adalora", tmp_path)
    assert adalora.peft.options["total_step"] == 2 and adalora.peft.options["target_modules"] == ["q_proj", "v_proj"]
    cfg["peft"]["total_step"] = 7
    assert method_config(config_from_dict(cfg), "adalora", tmp_path).peft.options["total_step"] == 7
    del cfg["peft"]["total_step"]
    cfg["train"] = {"epochs": 1, "batch_size": 4}
    with pytest.raises(ConfigError, match="adalora needs peft.total_step"):
        method_config(config_from_dict(cfg), "adalora", tmp_path)


def test_compare_writes_table_json_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    result = compare(config_from_dict(_config(tmp_path)), ["lora", "full"], out, isolate=False)
    rows = result["methods"]
    assert set(rows) == {"lora", "full"}
    assert rows["lora"]["trainable"] == (2 * 16 + 16 * 2) + (2 * 16 + 8 * 2)  # one layer; q: 16→16, v: 16→8 (GQA)
    assert rows["full"]["trainable"] == rows["full"]["total"] > rows["lora"]["trainable"]
    assert rows["lora"]["adapter_bytes"] < rows["full"]["adapter_bytes"]
    for row in rows.values():
        assert len(row["losses"]) == 2 and row["time_per_step_s"] > 0 and row["tokens_per_s"] > 0
        assert "loss" in row["eval"]
    saved = json.loads((out / "compare.json").read_text())
    assert saved["methods"]["lora"]["final_loss"] == rows["lora"]["final_loss"]
    table = (out / "compare.md").read_text()
    assert table.splitlines()[0].startswith("| method | trainable params")
    assert "| full |" in table and "| lora |" in table
    for png in ("loss.png", "memory_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_failed_method_is_a_row_not_a_crash(tmp_path: Path) -> None:
    table = markdown_table({"lora": {"error": "boom"}})
    assert "| lora | failed: boom |" in table
    # BitFit on a Llama (no biases) fails in its own process: the row holds the error's message, the log the rest.
    result = compare(config_from_dict(_config(tmp_path)), ["bitfit"], tmp_path / "out")
    row = result["methods"]["bitfit"]
    assert row["error"].startswith("peftkit.errors.") and "bias" in row["error"]
    assert "Traceback" in Path(row["log"]).read_text()
    assert f"| bitfit | failed: {row['error'][:200]} |" in result["table"]


def test_a_failed_method_makes_the_command_exit_3_after_writing_the_others(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["compare", str(path), "--methods", "lora,bitfit", "--out", str(out)]) == 3  # BitFit: no bias here
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"peftkit compare: 1 of 2 methods failed (bitfit); their errors are in "
                                    f"{out / 'compare.json'} and {out / 'compare.md'}; bitfit's output is in "
                                    f"{out / 'bitfit' / 'compare_error.log'}")
    rows = json.loads((out / "compare.json").read_text())["methods"]
    assert "bias" in rows["bitfit"]["error"] and len(rows["lora"]["losses"]) == 2
    assert "Traceback" in (out / "bitfit" / "compare_error.log").read_text()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_method_training_in_its_own_process_reports_its_progress(tmp_path: Path, monkeypatch, capsys) -> None:
    from peftkit.train import compare as module

    monkeypatch.setattr(module, "PROGRESS_SECONDS", 0.05)
    cfg = _config(tmp_path)
    cfg["train"]["max_steps"] = 6
    out = tmp_path / "out"
    (out / "lora").mkdir(parents=True)
    (out / "lora" / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')  # an earlier comparison's
    rows = compare(config_from_dict(cfg), ["lora"], out)["methods"]
    shown = [line for line in capsys.readouterr().out.splitlines() if " at step " in line]
    steps = [int(line.split(" at step ")[1].split()[0]) for line in shown]
    assert shown and steps == sorted(set(steps)) and set(steps) <= set(range(1, 7))
    for line, step in zip(shown, steps, strict=True):  # each line: that step's logged loss
        assert line == f"compare: lora at step {step} of 6, loss {rows['lora']['losses'][step - 1]:.4f}"


def test_results_of_finished_methods_are_on_disk_when_a_later_one_is_interrupted(tmp_path: Path, monkeypatch,
                                                                                 capsys) -> None:
    from peftkit.train import compare as module

    real = module.run_one
    monkeypatch.setattr(module, "run_one", lambda cfg: real(cfg) if cfg.peft.method == "lora" else _interrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        compare(config_from_dict(_config(tmp_path)), ["lora", "ia3"], out, isolate=False)
    assert capsys.readouterr().out.splitlines() == [f"compare: training lora (1/2) in {out / 'lora'}",
                                                    f"compare: training ia3 (2/2) in {out / 'ia3'}"]
    rows = json.loads((out / "compare.json").read_text())["methods"]
    assert list(rows) == ["lora"] and len(rows["lora"]["losses"]) == 2
    assert (out / "compare.md").read_text() == markdown_table(rows)


def _interrupt() -> None:
    raise KeyboardInterrupt


def test_cli_parser_registers_compare() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "cfg.yaml", "train.max_steps=5", "--methods", "lora,ia3"])
    assert args.methods == "lora,ia3" and args.overrides == ["train.max_steps=5"] and callable(args.func)


def test_a_missing_data_file_is_one_error_before_any_method_runs(tmp_path: Path, capsys) -> None:
    """Every method reads the same data: a missing file is refused once, up front, and nothing is written."""
    cfg = _config(tmp_path)
    cfg["data"]["eval"] = str(tmp_path / "held_out.jsonl")  # does not exist
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["compare", str(path), "--methods", "lora,ia3,full", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("does not exist") == 1 and "held_out.jsonl" in err
    assert not out.exists()
    cfg["data"]["train"] = ""
    with pytest.raises(ConfigError, match="data.train is not set"):
        compare(config_from_dict(cfg), ["lora"], out)


def test_loraplus_reaches_only_the_methods_with_b_matrices(tmp_path: Path, capsys) -> None:
    """LoRA+ is part of a LoRA recipe: compared with IA3 or full fine-tuning, those train with the plain optimizer
    (they would refuse the ratio), LoRA and DoRA keep it, and the command says which is which."""
    pytest.importorskip("matplotlib")
    cfg = _config(tmp_path)
    cfg["optimizer"] = {"loraplus_ratio": 16}
    base = config_from_dict(cfg)
    assert method_config(base, "dora", tmp_path).optimizer.loraplus_ratio == 16
    for method in ("ia3", "full", "loha"):
        assert method_config(base, method, tmp_path).optimizer.loraplus_ratio == 0
    result = compare(base, ["lora", "ia3"], tmp_path / "out")
    assert all("error" not in row for row in result["methods"].values())
    out = capsys.readouterr().out
    assert ("optimizer.loraplus_ratio=16 (LoRA+) applies to lora, dora, canonical_lora, adalora; "
            "ia3 train without it") in out


def test_plots_stay_legible_for_many_methods(tmp_path: Path) -> None:
    """One horizontal bar per method: the figure grows with their number."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from peftkit.train.compare import plot

    rows = {f"method_{i}": {"losses": [3.0 - 0.1 * i, 2.9 - 0.1 * i], "peak_memory_bytes": (i + 1) * 2**20,
                            "time_per_step_s": 0.01 * (i + 1)} for i in range(14)}
    few = dict(list(rows.items())[:2])
    (tmp_path / "few").mkdir()
    plot(few, tmp_path / "few")
    plot(rows, tmp_path)
    tall, short = Image.open(tmp_path / "memory_time.png"), Image.open(tmp_path / "few" / "memory_time.png")
    assert tall.size[1] > 2 * short.size[1]


def test_a_method_named_twice_is_refused(tmp_path: Path) -> None:
    base = config_from_dict(_config(tmp_path))
    with pytest.raises(ConfigError, match=r"names the same method twice: 'lora' and 'lora'; list each method once"):
        compare(base, ["lora", "ia3", "lora"], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'none' and 'full' \('full' is 'none'\)"):
        compare(base, ["none", "full"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_method_field_missing_from_the_config_is_named_in_the_hint(tmp_path: Path) -> None:
    hint = (r"--methods trainable_tokens: token_indices=\(\) .*\(peft\.token_indices=VALUE on the command line: .*\) "
            r"or for this method alone \(--set trainable_tokens\.token_indices=VALUE\)")
    with pytest.raises(ConfigError, match=hint):
        method_config(config_from_dict(_config(tmp_path)), "trainable_tokens", tmp_path)


def test_set_gives_one_method_its_own_fields(tmp_path: Path) -> None:
    """``--set METHOD.FIELD=VALUE`` reaches that method alone, over what it takes from the config's peft section,
    and its value is not mistaken for a config override on the command line."""
    pytest.importorskip("matplotlib")
    from peftkit.train.compare import parse_sets

    assert parse_sets(["ia3.target_modules=[q_proj]", "ia3.feedforward_modules=[]", "ln_tuning.target_modules=x"]) == {
        "ia3": {"target_modules": ["q_proj"], "feedforward_modules": []}, "ln_tuning": {"target_modules": "x"}}
    for bad in ("rank=4", "lora.rank", "lora.a.b=1", ".rank=2"):
        with pytest.raises(ConfigError, match=r"--set .* is invalid; write METHOD.FIELD=VALUE"):
            parse_sets([bad])
    base = config_from_dict(_config(tmp_path))
    ia3 = method_config(base, "ia3", tmp_path, {"target_modules": ["q_proj"], "feedforward_modules": []})
    assert ia3.peft.options["target_modules"] == ["q_proj"]
    assert method_config(base, "dora", tmp_path).peft.options["target_modules"] == ["q_proj", "v_proj"]
    path, out = tmp_path / "run.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    argv = ["compare", str(path), "--methods", "ia3", "--set", "ia3.target_modules=[q_proj]",
            "--set=ia3.feedforward_modules=[]", "train.max_steps=1", "--out", str(out)]
    assert main(argv) == 0
    row = json.loads((out / "compare.json").read_text())["methods"]["ia3"]
    assert row["trainable"] == 16 and len(row["losses"]) == 1  # one IA3 vector on q_proj's 16 outputs, one step


@pytest.mark.parametrize(("methods", "sets", "message"), [
    (["lora"], {"dora": {"rank": 4}}, r"--set names 'dora', which --methods does not list \(lora\)"),
    (["lora"], {"lora": {"rnak": 4}}, r"--set lora.rnak: lora has no field 'rnak'; did you mean 'rank'\?"),
    (["lora", "full"], {"full": {"rank": 4}}, r"--set full.rank: full trains every base weight and has no peft"),
    (["lorra"], {"lorra": {"rank": 4}}, r"unknown method 'lorra' in --methods \(did you mean 'lora'\?\)"),
])
def test_set_is_checked_before_anything_runs(tmp_path: Path, methods, sets, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compare(config_from_dict(_config(tmp_path)), methods, tmp_path / "out", method_options=sets)
    assert not (tmp_path / "out").exists()


def test_peak_memory_is_the_training_steps_not_the_evaluation(tmp_path: Path, monkeypatch) -> None:
    """The column is the training steps' peak over the memory before training: an evaluation that holds 256 MiB
    (between steps or after the last) does not count."""
    import ctypes
    import gc
    import sys

    import torch

    from peftkit.train import loop

    if not sys.platform.startswith("linux"):
        pytest.skip("peak resident memory is read from /proc (Linux)")
    real = loop.evaluate
    held = []

    def heavy(*args, **kwargs):
        held.append(torch.ones(64 * 2**20))  # 256 MiB, every page touched
        result = real(*args, **kwargs)
        held.clear()
        return result

    monkeypatch.setattr(loop, "evaluate", heavy)
    cfg = _config(tmp_path)
    cfg["eval"] = {"interval": 1}
    # In-process, the steps could reuse pages earlier tests freed but glibc kept, and raise no peak at all; in its own
    # process (compare's default) there are none. Hand them back first.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    row = compare(config_from_dict(cfg), ["lora"], tmp_path / "out", isolate=False)["methods"]["lora"]
    assert row["eval"]  # the evaluation ran
    assert 0 < row["peak_memory_bytes"] < 128 * 2**20
