"""In-process pieces of the distributed layer: data split, what DDP/FSDP communicate, launch errors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torchrun_helpers import free_port

import peftkit as pk
from peftkit.errors import ConfigError
from peftkit.train.config import RunConfig, config_from_dict
from peftkit.train.dist_failure import fault_due
from peftkit.train.distributed import Dist, init, rank_slice, transformer_blocks, wrap

from models import llama


@pytest.fixture
def group() -> Iterator[None]:
    """A one-process gloo group (DDP and FSDP still run their communication paths)."""
    store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _adapted() -> torch.nn.Module:
    torch.manual_seed(0)
    model = llama()
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, alpha=8, init_B="gaussian"))
    return model


def _backward(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def test_ranks_split_the_global_batch_in_order():
    batch = list(range(8))
    parts = [rank_slice(batch, Dist("ddp", r, 4)) for r in range(4)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_slice(batch, Dist()) == batch


def test_ddp_all_reduces_only_adapter_gradients(group):
    model = _adapted()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < sum(p.numel() for p in model.parameters()) // 10
    ddp = wrap(model, Dist("ddp", 0, 1), torch.device("cpu"))
    sent: list[int] = []

    def hook(state, bucket):  # records every bucket DDP all-reduces, then reduces as usual
        sent.append(bucket.buffer().numel())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    _backward(ddp)
    assert sum(sent) == trainable


def test_fsdp_shards_each_block_and_reduces_only_adapter_gradients(group):
    from torch.distributed.tensor import DTensor

    model = _adapted()
    blocks = transformer_blocks(model)
    assert blocks == list(model.model.layers)
    wrap(model, Dist("fsdp", 0, 1), torch.device("cpu"))
    assert all(type(b).__name__.startswith("FSDP") for b in blocks)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    _backward(model)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad} and grads


def test_parallel_without_torchrun_names_the_launch_command(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = config_from_dict(
        {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}, "train": {"parallel": "ddp"}}
    )
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N -m peftkit train"):
        init(cfg)
    lisa = config_from_dict(
        {
            "checkpoint": {"pretrained": {"config": {"model_type": "llama"}}},
            "train": {"parallel": "fsdp"},
            "optimizer": {"lisa_layers": 1},
        }
    )
    with pytest.raises(ConfigError, match="optimizer.lisa_layers=1"):
        init(lisa)
    with pytest.raises(ConfigError, match="train.parallel='tp'"):
        config_from_dict(
            {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}, "train": {"parallel": "tp"}}
        )
    assert init(config_from_dict({"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}})) == Dist()
    assert "RANK" not in os.environ


def test_parallel_none_under_torchrun_with_several_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config_from_dict({"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}})
    with pytest.raises(ConfigError, match=r"parallel='none' but torchrun started 2 processes .*parallel=ddp"):
        init(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init(cfg) == Dist()


def test_parallel_misuse_is_refused_before_save_dir_is_created(tmp_path, monkeypatch):
    from peftkit.train.loop import train

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    save_dir = tmp_path / "run"
    cfg = config_from_dict({
        "checkpoint": {"pretrained": {"config": {"model_type": "llama"}}, "save_dir": str(save_dir)},
        "train": {"parallel": "fsdp"}, "peft": {"method": "lora", "layer_replication": [[0, 1]]},
    })
    with pytest.raises(ConfigError, match="layer_replication cannot run with train.parallel='fsdp'"):
        train(cfg)
    assert not save_dir.exists()


def test_fault_spec_targets_a_step_and_optionally_a_rank():
    assert fault_due("3", 3, Dist("ddp", 1, 2)) and not fault_due("3", 2, Dist())
    assert fault_due("3@1", 3, Dist("ddp", 1, 2)) and not fault_due("3@1", 3, Dist("ddp", 0, 2))


def test_fsdp_refuses_adalora_and_ddp_does_not(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    peft = {"method": "adalora", "target_modules": ["q_proj"], "init_rank": 4, "target_rank": 2, "total_step": 4}

    def cfg(parallel: str) -> RunConfig:
        return config_from_dict(
            {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}, "train": {"parallel": parallel},
             "peft": peft}
        )

    with pytest.raises(ConfigError, match="peft.method='adalora' cannot run with train.parallel='fsdp'.*ddp"):
        init(cfg("fsdp"))
    with pytest.raises(ConfigError, match="needs torchrun's environment"):  # past the AdaLoRA check
        init(cfg("ddp"))
