"""Memory estimates on a meta-device Llama-2-7B shape, checked against a measured small model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError
from peftkit.quant import estimate_training_memory, memory_report, quantize

transformers = pytest.importorskip("transformers")
GIB = 1024**3


def _llama(meta: bool, **shape: int) -> nn.Module:
    config = transformers.LlamaConfig(**shape)
    if meta:
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config)
    return transformers.LlamaForCausalLM(config)


def test_llama2_7b_full_vs_lora_vs_qlora() -> None:
    model = _llama(True)  # LlamaConfig's defaults are Llama-2-7B: 6.74B parameters
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(6.74e9, rel=0.01)
    full = estimate_training_memory(model, method="full")
    lora = estimate_training_memory(model, method="lora", rank=16)
    qlora = estimate_training_memory(model, method="qlora", rank=16)
    assert full.total == 16 * n  # fp16 weights and grads, fp32 master and two moments
    assert lora.weights_by_dtype["fp16"] == 2 * n
    assert lora.trainable_params == qlora.trainable_params == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert 13.0 < lora.total / GIB < 13.3  # 12.55 GiB fp16 weights + 0.6 GiB adapter state
    # NF4 linear layers (6.48B × 4.127 bits = 3.11 GiB) + fp16 embeddings and head (0.49 GiB) + adapters
    assert 4.0 < qlora.total / GIB < 4.4
    assert full.total / qlora.total > 23  # 100 GiB vs 4.2 GiB


def test_estimate_agrees_with_measured_small_model() -> None:
    shape = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    estimate = estimate_training_memory(_llama(True, **shape), method="qlora", rank=8, dtype="fp32")
    model = quantize(_llama(False, **shape), skip=("lm_head",))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pk.apply(model, pk.LoRA(target_modules=targets, rank=8))
    measured = memory_report(model)
    assert measured.trainable_params == estimate.trainable_params
    assert measured.optimizer == estimate.optimizer
    assert measured.quantized == pytest.approx(estimate.quantized, rel=0.01)
    frozen = sum(measured.weights_by_dtype.values())
    assert frozen == pytest.approx(estimate.weights_by_dtype["fp32"], rel=0.01)


def test_estimate_targets_as_lora_resolves_them() -> None:
    """A str is one pattern and ``all-linear`` is the alias LoRA knows: the same count as the adapter it estimates."""
    shape = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2}
    meta = _llama(True, **shape)
    for targets in ("q_proj", "all-linear", ["all-linear"], ["*.layers.0.*.q_proj", "v_proj"]):
        estimate = estimate_training_memory(meta, method="qlora", rank=8, target_modules=targets)
        model = pk.apply(_llama(False, **shape), pk.LoRA(target_modules=targets, rank=8))
        assert estimate.trainable_params == memory_report(model).trainable_params > 0
    one, listed = (estimate_training_memory(meta, method="qlora", skip=s).quantized for s in ("lm_head", ["lm_head"]))
    assert one == listed


def test_estimate_refuses_targets_that_match_nothing() -> None:
    from peftkit.errors import TargetNotFoundError, UnsupportedLayerError

    meta = _llama(True, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    with pytest.raises(TargetNotFoundError, match=r"'qproj' matches no module .*closest module names: \['q_proj'"):
        estimate_training_memory(meta, method="qlora", target_modules=["qproj"])
    with pytest.raises(UnsupportedLayerError, match="'norm' matches only modules of type LlamaRMSNorm"):
        estimate_training_memory(meta, method="lora", target_modules="norm")
    assert estimate_training_memory(nn.Linear(2, 2), method="lora").trainable_params == 0  # default: those present


def test_bad_method() -> None:
    with pytest.raises(ConfigError, match="method='prefix'"):
        estimate_training_memory(nn.Linear(2, 2), method="prefix")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_still_count_as_parameters(bits: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    _, total = pk.count_parameters(model)
    quantize(model, bits=bits)
    assert pk.count_parameters(model)[1] == total  # packed into buffers, the weights are still the model's
    pk.prepare_for_kbit_training(model)
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=16))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert pk.count_parameters(model) == (lora, total + lora)


@pytest.mark.parametrize("targets", [["c_attn", "c_proj", "c_fc"], "all-linear", ["c_attn", "wte"], None])
def test_estimate_counts_the_layers_lora_adapts_on_gpt2(targets) -> None:
    """GPT-2's projections are ``Conv1D`` (weight stored in × out) and its embeddings can carry LoRA too; without
    targets, the estimate and pk.LoRA() both take GPT-2's default (``c_attn``)."""
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    with torch.device("meta"):
        meta = transformers.GPT2LMHeadModel(config)
    estimate = estimate_training_memory(meta, method="lora", rank=4, target_modules=targets)
    model = pk.apply(transformers.GPT2LMHeadModel(config), pk.LoRA(target_modules=targets or (), rank=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.trainable_params == trainable == memory_report(model).trainable_params > 0
    assert estimate.optimizer == 8 * trainable


def test_estimate_counts_lora_on_embeddings_and_convolutions() -> None:
    model = nn.Sequential(nn.Embedding(50, 8), nn.Conv2d(3, 6, (3, 5)), nn.Conv1d(4, 2, 3), nn.Linear(8, 4))
    estimate = estimate_training_memory(model, method="lora", rank=2, target_modules=["0", "1", "2", "3"])
    pk.apply(model, pk.LoRA(target_modules=["0", "1", "2", "3"], rank=2))
    assert estimate.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
