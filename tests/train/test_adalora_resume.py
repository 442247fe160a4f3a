"""AdaLoRA's rank allocator in training checkpoints: resume == uninterrupted, bit for bit; misfits rejected."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import CheckpointError, ShapeMismatchError
from peftkit.methods.adalora import allocator_states, load_allocator_states
from peftkit.train import checkpoint as ckpt
from peftkit.train.config import config_from_dict
from peftkit.train.loop import train

# 9 steps: importance from step 0, a shrinking budget masked every step from 2, the final allocation at
# step 6 (which clears the EMAs), then the fixed pattern. Checkpoints at 3 (mid-schedule), 6 and 9.
ADALORA = {"method": "adalora", "target_modules": ["q_proj", "v_proj"], "init_rank": 4, "target_rank": 2,
           "tinit": 1, "tfinal": 3, "deltaT": 1, "total_step": 9, "alpha": 8, "orth_reg_weight": 0.1}


def _adalora_run(run_config: Any, save_dir: Path) -> dict[str, Any]:
    cfg = run_config(train={"max_steps": 9}, checkpoint={"save_interval": 3, "keep_last": 0, "save_dir": str(save_dir)},
                     data={"eval_fraction": 0.0}, optimizer={"lr": 0.05})
    cfg["peft"] = dict(ADALORA)
    return cfg


def _resume_copy(full: Path, cut: Path, step: int) -> None:
    """``cut`` holds only ``full``'s checkpoint at ``step``, as if the run had been killed just after it."""
    cut.mkdir(parents=True)
    shutil.copytree(full / f"step-{step}", cut / f"step-{step}")


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_resumed_adalora_run_matches_uninterrupted_bit_for_bit(run_config, tmp_path):
    cfg = _adalora_run(run_config, tmp_path / "full")
    full = train(config_from_dict(cfg))
    ema = load_file(str(tmp_path / "full" / "step-3" / ckpt.ALLOCATOR_TENSORS))
    assert any(key.startswith("default/ema_ipt.") for key in ema) and all(v.abs().sum() > 0 for v in ema.values())

    _resume_copy(tmp_path / "full", tmp_path / "cut", 3)
    resumed = train(config_from_dict({**cfg, "checkpoint": {**cfg["checkpoint"], "save_dir": str(tmp_path / "cut"),
                                                             "resume": "auto"}}))
    assert resumed["losses"] == full["losses"]
    for step in (6, 9):
        full_dir, cut_dir = tmp_path / "full" / f"step-{step}", tmp_path / "cut" / f"step-{step}"
        _assert_same_tensors(full_dir / "trainable.safetensors", cut_dir / "trainable.safetensors")
        _assert_same_tensors(full_dir / ckpt.ALLOCATOR_TENSORS, cut_dir / ckpt.ALLOCATOR_TENSORS)
        assert json.loads((full_dir / ckpt.ALLOCATOR_META).read_text()) == json.loads(
            (cut_dir / ckpt.ALLOCATOR_META).read_text())
    # the final adapter: identical kept triplets (rank masks) and identical tensors
    final_full, final_cut = Path(full["adapter"]), Path(resumed["adapter"])
    pattern = json.loads((final_full / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern == json.loads((final_cut / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(sum(mask) for mask in pattern.values()) == 2 * len(pattern)  # pruned to the target budget
    _assert_same_tensors(final_full / "adapter_model.safetensors", final_cut / "adapter_model.safetensors")


def test_checkpoint_without_allocator_state_resumes_with_a_warning(run_config, tmp_path, caplog):
    cfg = _adalora_run(run_config, tmp_path / "full")
    train(config_from_dict(cfg))
    _resume_copy(tmp_path / "full", tmp_path / "old", 3)
    for name in (ckpt.ALLOCATOR_TENSORS, ckpt.ALLOCATOR_META):  # as written before allocator state was saved
        (tmp_path / "old" / "step-3" / name).unlink()
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        summary = train(config_from_dict({**cfg, "checkpoint": {**cfg["checkpoint"],
                                                                "save_dir": str(tmp_path / "old"), "resume": "auto"}}))
    assert summary["steps"] == 9 and len(summary["losses"]) == 9
    assert any("no AdaLoRA allocator state" in r.getMessage() for r in caplog.records)
    # the EMAs restarted from zero: exactly what the saved allocator state prevents
    full_ema = load_file(str(tmp_path / "full" / "step-6" / ckpt.ALLOCATOR_TENSORS))
    old_ema = load_file(str(tmp_path / "old" / "step-6" / ckpt.ALLOCATOR_TENSORS))
    assert any(not torch.equal(full_ema[k], old_ema[k]) for k in full_ema)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.tanh(self.q_proj(x)))


def _tiny(steps: int) -> nn.Module:
    """A two-layer AdaLoRA model after ``steps`` allocation steps."""
    torch.manual_seed(0)
    model = pk.apply(_Tiny(), pk.AdaLoRA(target_modules=["q_proj", "v_proj"], init_rank=4, target_rank=2,
                                         tinit=0, tfinal=2, total_step=8))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 8)
    for step in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        pk.adalora_step(model, step)
        opt.zero_grad()
    return model


def test_allocator_state_round_trips_into_a_rebuilt_model():
    state = allocator_states(_tiny(3))["default"]
    assert {k for k in state if not isinstance(state[k], torch.Tensor)} == {"layers", "tensors", "rank_pattern",
                                                                           "rank_mask"}
    assert json.loads(json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}))
    rebuilt = _tiny(0)
    load_allocator_states(rebuilt, {"default": state})
    again = allocator_states(rebuilt)["default"]
    assert again.keys() == state.keys() and len(state["tensors"]) == 12  # 2 layers × (P, Q, λ) × (Ī, Ū)
    for key, value in state.items():
        assert torch.equal(again[key], value) if isinstance(value, torch.Tensor) else again[key] == value
    assert get_state(rebuilt).configs["default"].rank_pattern == state["rank_pattern"]
    assert state["rank_mask"]["q_proj"] == state["rank_pattern"]["q_proj"] and len(state["rank_mask"]) == 2


def _drop(key: str) -> Any:
    return lambda s: s.pop(key)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (_drop("layers"), CheckpointError, "missing key 'layers'"),
        (_drop("ema_unc.v_proj.lora_B"), CheckpointError, "missing key 'ema_unc.v_proj.lora_B'"),
        (lambda s: s.update(bogus=1), CheckpointError, "unexpected key 'bogus'"),
        (lambda s: s.update({"ema_ipt.q_proj.lora_A": torch.zeros(3, 8)}), ShapeMismatchError,
         "'ema_ipt.q_proj.lora_A' has shape (3, 8) but the model's parameter has (4, 8)"),
        (lambda s: s["layers"].update(v_proj=5), CheckpointError, "layer 'v_proj' has saved rank 5 but rank 4"),
        (lambda s: s["rank_mask"].update(k_proj=[True]), CheckpointError, "rank_mask['k_proj'] does not fit"),
    ],
    ids=["no-meta", "no-tensor", "extra", "shape", "rank", "mask"],
)
def test_misfit_allocator_state_is_rejected_before_anything_changes(mutate, error, message):
    state = allocator_states(_tiny(3))["default"]
    state["layers"] = dict(state["layers"])
    state["rank_mask"] = dict(state["rank_mask"])
    mutate(state)
    target = _tiny(1)  # already has an allocator and EMAs of its own
    before = allocator_states(target)["default"]
    with pytest.raises(error, match=re.escape(message)) as exc:
        load_allocator_states(target, {"default": state})
    assert "checkpoint.resume=none" in str(exc.value)  # the message says what to do
    after = allocator_states(target)["default"]
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value


def test_allocator_state_for_an_unknown_adapter_is_rejected():
    state = allocator_states(_tiny(2))["default"]
    with pytest.raises(CheckpointError, match="'other', which is not an AdaLoRA adapter"):
        load_allocator_states(_tiny(0), {"other": state})
