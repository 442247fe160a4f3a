"""Hugging Face's ``Trainer`` on a model adapted by peftkit: only the adapter trains, checkpoints resume it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peftkit as pk


class _Repeat(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(12) * (i % 5 + 1) + i) % 64
        return {"input_ids": ids, "labels": ids}


def _model(quantized: bool = False, adapt: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    if quantized:
        pk.quantize(model, skip=["lm_head"])
    if adapt:
        pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj", "down_proj"], rank=4, alpha=8))
    return model


def _trainer(model: torch.nn.Module, out: Path, steps: int, **kwargs: object) -> Trainer:
    options: dict[str, object] = {"save_strategy": "no", **kwargs}
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **options)
    return Trainer(model=model, args=args, train_dataset=_Repeat())


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_trainer_trains_the_adapter_alone(tmp_path, quantized):
    model = _model(quantized)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    before = _adapter(model)
    result = _trainer(model, tmp_path, 6).train()
    assert result.training_loss == result.training_loss  # not NaN
    after = _adapter(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)  # B starts at zero and moves
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in frozen.items())
    pk.save_adapter(model, tmp_path / "adapter")
    fresh = pk.load_adapter(_model(quantized, adapt=False), tmp_path / "adapter")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("formed", [True, False], ids=["groups-formed-first", "groups-form-during-training"])
def test_trainer_resumes_the_adapter_from_its_checkpoint(tmp_path, formed):
    """Trainer's checkpoints hold the whole state dict (adapter included): a fresh adapted model resumed from one
    ends where the uninterrupted run ended; bit for bit when both runs form their sibling groups first."""

    def run(out: str, steps: int, resume: str | None = None, **kwargs: object) -> dict[str, torch.Tensor]:
        model = _model().train()
        if formed:
            pk.form_groups(model, **{k: v[None].repeat(4, 1) for k, v in _Repeat()[0].items()})
        _trainer(model, tmp_path / out, steps, **kwargs).train(resume_from_checkpoint=resume)
        return _adapter(model)

    expected = run("whole", 4, save_strategy="steps", save_steps=2)
    got = run("resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert expected.keys() == got.keys()
    for name in expected:
        if formed:
            assert torch.equal(expected[name], got[name]), name
        else:  # the first step after resuming runs per-layer kernels: the same numbers up to rounding
            assert torch.allclose(expected[name], got[name], atol=1e-6), name
