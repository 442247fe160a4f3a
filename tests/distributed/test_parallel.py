"""torchrun with 2 CPU processes (gloo) against one process: DDP, FSDP2, resume across process counts, failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torchrun_helpers import TEXT, losses, make_config, torchrun

from peftkit.train import checkpoint as ckpt
from peftkit.train.config import config_from_dict
from peftkit.train.dist_failure import FAULT_RAISE_ENV
from peftkit.train.loop import FAULT_ENV, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def reference(data_file: Path, work: Path) -> dict[str, Any]:
    """One process, batch 4 (= 2 ranks × 2), checkpoints every 2 steps."""
    cfg = make_config(data_file, work / "single", train={"batch_size": 4}, checkpoint={"save_interval": 2})
    return train(config_from_dict(cfg))


@pytest.fixture(scope="module")
def ddp_run(data_file: Path, work: Path) -> Path:
    cfg = make_config(
        data_file, work / "ddp", train={"parallel": "ddp", "batch_size": 2}, checkpoint={"save_interval": 2}
    )
    done = torchrun(cfg, work)
    assert done.returncode == 0, done.stderr[-4000:]
    return work / "ddp"


def test_ddp_matches_one_process_with_twice_the_batch(reference, ddp_run):
    assert losses(ddp_run) == pytest.approx(reference["losses"], abs=1e-5)  # rank 0 logged each step once
    _close(
        load_file(str(ddp_run / "final" / "adapter_model.safetensors")),
        load_file(str(Path(reference["adapter"]) / "adapter_model.safetensors")),
        1e-5,
    )


def test_ddp_checkpoint_resumes_in_one_process(reference, ddp_run, data_file, work, capsys):
    cfg = make_config(
        data_file, work / "ddp-to-1", train={"batch_size": 4}, checkpoint={"resume": str(ddp_run / "step-2")}
    )
    summary = train(config_from_dict(cfg))
    assert summary["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert "warning" not in capsys.readouterr().err  # 2 × 2 -> 1 × 4: the same global batch


def test_resume_on_fewer_processes_with_the_same_batch_size_warns(ddp_run, data_file, work, capsys):
    cfg = make_config(
        data_file, work / "ddp-to-1-half", train={"batch_size": 2}, checkpoint={"resume": str(ddp_run / "step-2")}
    )
    train(config_from_dict(cfg))
    err = capsys.readouterr().err
    assert "global batch (processes × train.batch_size): 2 × 2 -> 1 × 2; set train.batch_size=4 to keep it" in err


@pytest.fixture(scope="module")
def fsdp_killed(data_file: Path, work: Path) -> tuple[Path, Any]:
    """FSDP on 2 processes; rank 1 is SIGKILLed after step 3 (step-2 is the last checkpoint)."""
    cfg = make_config(
        data_file, work / "fsdp", train={"parallel": "fsdp", "batch_size": 2}, checkpoint={"save_interval": 2}
    )
    done = torchrun(cfg, work, env={FAULT_ENV: "3@1"})
    return work / "fsdp", done


def test_dead_rank_stops_run_with_message_and_keeps_last_checkpoint(fsdp_killed, reference):
    out, done = fsdp_killed
    assert done.returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2"]
    assert not list(out.glob(".tmp-*"))
    # rank 0 names what happened and where to resume (its collective failed, or torchrun stopped it)
    assert "rank 0 of 2" in done.stderr and f"last complete checkpoint is {out / 'step-2'}" in done.stderr
    assert losses(out)[:3] == pytest.approx(reference["losses"][:3], abs=1e-5)


def test_fsdp_checkpoint_is_hf_format_and_sharded(fsdp_killed, reference):
    step = fsdp_killed[0] / "step-2"
    assert len(list((step / "optimizer-sharded").glob("*.safetensors"))) == 2  # one shard file per rank
    assert not (step / "optimizer.safetensors").exists()
    single = Path(reference["checkpoint"]).parent / "step-2"
    _close(
        load_file(str(step / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors")), 1e-5
    )
    _close(load_file(str(step / "trainable.safetensors")), load_file(str(single / "trainable.safetensors")), 1e-5)


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_killed, reference, data_file, work):
    cfg = make_config(
        data_file, work / "fsdp-to-1", train={"batch_size": 4}, checkpoint={"resume": str(fsdp_killed[0] / "step-2")}
    )
    summary = train(config_from_dict(cfg))
    assert summary["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    _close(
        load_file(str(Path(summary["adapter"]) / "adapter_model.safetensors")),
        load_file(str(Path(reference["adapter"]) / "adapter_model.safetensors")),
        1e-5,
    )


def test_fsdp_resumes_on_two_processes_and_matches_one(fsdp_killed, reference, data_file, work):
    out, _ = fsdp_killed
    cfg = make_config(
        data_file, out, train={"parallel": "fsdp", "batch_size": 2}, checkpoint={"save_interval": 2, "resume": "auto"}
    )
    done = torchrun(cfg, work)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(out) == pytest.approx(reference["losses"], abs=1e-5)
    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    _close(final, load_file(str(Path(reference["adapter"]) / "adapter_model.safetensors")), 1e-5)


def test_fsdp_adapter_loads_in_peftkit_and_hf_peft(fsdp_killed, reference):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from torchrun_helpers import LLAMA

    import peftkit as pk

    final = fsdp_killed[0] / "final"
    if not final.is_dir():
        pytest.skip("needs the resumed FSDP run")
    raw = dict(LLAMA)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(config)
    theirs = transformers.AutoModelForCausalLM.from_config(config)
    theirs.load_state_dict(ours.state_dict())
    pk.load_adapter(ours, final)
    theirs = peft.PeftModel.from_pretrained(theirs, str(final))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_one_rank_raising_ends_every_rank(data_file, work):
    cfg = make_config(
        data_file,
        work / "raise",
        train={"parallel": "ddp", "batch_size": 2, "dist_timeout": 600},
        checkpoint={"save_interval": 1},
    )
    done = torchrun(cfg, work, env={FAULT_RAISE_ENV: "2@1"}, timeout=120)  # far below dist_timeout: no hang
    assert done.returncode != 0
    assert "RuntimeError: injected fault after step 2 on rank 1" in done.stderr  # rank 1's own error
    assert "rank 0: stopping because rank 1 failed with RuntimeError: injected fault" in done.stderr
    assert [p.name for p in ckpt.list_checkpoints(work / "raise")] == ["step-1", "step-2"]


def test_ddp_weights_ranks_by_their_target_tokens(work):
    """Responses of different lengths, no packing: the ranks' slices hold different numbers of target tokens,
    and the loss is still the mean over the whole global batch's targets, as in one process."""
    import json

    words = TEXT[:40]
    rows = [{"instruction": " ".join(words[i:i + 2]), "input": "", "output": " ".join(words[i:i + 1 + i % 7])}
            for i in range(24)]
    path = work / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = []
    for save_dir, train_section in [("instr-one", {}), ("instr-ddp", {"parallel": "ddp", "batch_size": 2})]:
        cfg = make_config(path, work / save_dir, train={"max_steps": 2, **train_section})
        cfg["data"].update({"format": "instruction", "packing": False, "max_length": 160})
        configs.append(cfg)
    one = train(config_from_dict(configs[0]))
    cfg = configs[1]
    done = torchrun(cfg, work)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(work / "instr-ddp") == pytest.approx(one["losses"], abs=1e-5)
    _close(
        load_file(str(work / "instr-ddp" / "final" / "adapter_model.safetensors")),
        load_file(str(Path(one["adapter"]) / "adapter_model.safetensors")),
        1e-5,
    )
