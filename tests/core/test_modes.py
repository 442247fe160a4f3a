"""Adapters take the train/eval mode of the model they are added to (dropout only where training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit as pk

from models import build, randomize_adapters, run


@pytest.mark.parametrize("config", [pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, dropout=0.5),
                                    pk.PTuning(num_virtual_tokens=2, encoder_hidden_size=8, encoder_dropout=0.5,
                                               encoder_reparameterization_type="LSTM")],
                         ids=["lora", "p_tuning"])
def test_an_adapter_added_to_an_evaluating_model_evaluates(config: pk.LoRA, tmp_path: Path) -> None:
    model = build("llama").eval()
    pk.apply(model, config)
    assert not any(m.training for m in model.modules())
    randomize_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama"), run(model, "llama"), rtol=0, atol=0)
    pk.save_adapter(model, tmp_path)
    fresh = build("llama").eval()
    pk.load_adapter(fresh, tmp_path)  # HF PEFT's load_adapter likewise leaves the model evaluating
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, "llama"), run(model, "llama"))


def test_an_adapter_added_to_a_training_model_trains() -> None:
    model = build("llama").train()
    model.model.layers[0].eval()  # a block the user keeps in evaluation mode keeps its new adapters there too
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, dropout=0.5))
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.training and layers[1].self_attn.q_proj.lora_dropout["default"].training
    assert not layers[0].self_attn.q_proj.training and not layers[0].self_attn.q_proj.lora_dropout["default"].training


def test_rank_pruning_keeps_an_evaluating_adapter_evaluating() -> None:
    model = build("llama").eval()
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=4, dropout=0.5))
    randomize_adapters(model)
    pk.prune(model, "default", target_rank=2)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(model, "llama"), run(model, "llama"), rtol=0, atol=0)
