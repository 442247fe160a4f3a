"""QDoRA: DoRA on a 4-bit / 8-bit base — training, formula parity, merging into the quantized base, HF PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.methods.dora import DoRALinear
from peftkit.quant import Linear4bit, Linear8bit, quantize
from peftkit.quant.nf4 import dequantize_4bit, quantize_4bit

from models import train_losses

transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _train(model: nn.Module, steps: int) -> list[float]:
    ids = _ids()
    return train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=1e-2, steps=steps)


def _qdora(compute_dtype: torch.dtype = torch.float32, bits: int = 4, steps: int = 4) -> nn.Module:
    """A tiny Llama quantized, with a DoRA adapter trained a few steps (so B ≠ 0 and m ≠ ‖W‖)."""
    model = quantize(_llama(), bits=bits, compute_dtype=compute_dtype)
    torch.manual_seed(1)
    pk.apply(model, pk.DoRA(target_modules=TARGETS, rank=4, alpha=8))
    _train(model, steps)
    return model


@pytest.mark.parametrize(("bits", "compute_dtype"), [(4, torch.float32), (4, torch.bfloat16), (8, torch.float32)])
def test_qdora_trains_adapters_only_and_loss_goes_down(bits: int, compute_dtype: torch.dtype) -> None:
    model = quantize(_llama(), bits=bits, compute_dtype=compute_dtype)
    pk.apply(model, pk.DoRA(target_modules=TARGETS, rank=8, alpha=16))
    kind = Linear4bit if bits == 4 else Linear8bit
    dora = [m for m in model.modules() if isinstance(m, DoRALinear)]
    assert len(dora) == 8 and all(isinstance(m.base_layer, kind) for m in dora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n for n in trainable)
    assert sum(".lora_magnitude_vector." in n for n in trainable) == 8
    magnitude = dora[0].lora_magnitude_vector["default"]
    start = magnitude.detach().clone()
    losses = _train(model, 12)
    assert losses[-1] < losses[0] - 0.3
    assert not torch.equal(magnitude.detach(), start)  # the magnitude learns too
    assert all(not b.requires_grad for b in model.buffers())


class _Proj(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_qdora_equals_dora_on_the_dequantized_weight() -> None:
    """Output and gradients of DoRA over a Linear4bit == DoRA over nn.Linear holding its dequantized weight."""
    torch.manual_seed(0)
    quant = Linear4bit(torch.randn(24, 64) * 0.1, torch.randn(24), compute_dtype=torch.float32)
    dense = nn.Linear(64, 24)
    with torch.no_grad():
        dense.weight.copy_(quant.dequantize())
        dense.bias.copy_(quant.bias)
    models = [_Proj(quant), _Proj(dense)]
    for model in models:
        torch.manual_seed(2)
        pk.apply(model, pk.DoRA(target_modules=["proj"], rank=4, alpha=8, init_B="gaussian"))
    q, d = (m.proj for m in models)
    with torch.no_grad():  # a magnitude away from its initial value: the (m/‖·‖ − 1)·Wx term matters
        for layer in (q, d):
            layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(3, 5, 64)
    ys = [m(x) for m in models]
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    for attr in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(q, attr)["default"].weight.grad, getattr(d, attr)["default"].weight.grad)
    torch.testing.assert_close(q.lora_magnitude_vector["default"].grad, d.lora_magnitude_vector["default"].grad)


def test_merge_requantizes_the_dora_weight_and_records_the_error() -> None:
    """merge = dequantize → W' = m·(W + sBA)/‖W + sBA‖ → requantize, bit for bit; unmerge goes back."""
    model = _qdora()
    ids = _ids()
    layers = [m for m in model.modules() if isinstance(m, DoRALinear)]
    expected = {}
    for layer in layers:
        W = layer.base_layer.dequantize(torch.float32)
        combined = W + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        target = (layer.lora_magnitude_vector["default"] / combined.norm(dim=1))[:, None] * combined
        expected[layer] = target.detach()
    float_model = pk.unload(_qdora(), merge=True, dequantize=True)  # the same adapter merged in fp32
    with torch.no_grad():
        before = model(input_ids=ids).logits
        float_out = float_model(input_ids=ids).logits
    pk.merge(model)
    for layer, target in expected.items():
        requantized = dequantize_4bit(quantize_4bit(target, "nf4", 64, double_quant=True))
        torch.testing.assert_close(layer.base_layer.dequantize(torch.float32), requantized, atol=0, rtol=0)
        error = float((requantized - target).abs().max())
        assert layer.merge_errors["default"] == pytest.approx(error) and error > 0
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    quantization_noise = (float_out - before).abs().mean()  # ≈ 0: the float merge is exact
    assert quantization_noise < 1e-5
    with torch.no_grad():
        reference = _llama()(input_ids=ids).logits
        noise_of_quantizing = (reference - quantize(_llama())(input_ids=ids).logits).abs().mean()
    assert 0 < (merged - before).abs().mean() < 2 * noise_of_quantizing
    pk.unmerge(model)
    assert all(not layer.merge_errors and not layer.merged_adapters for layer in layers)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    assert (unmerged - before).abs().mean() < 2 * noise_of_quantizing


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_unload_dequantize_merges_dora_into_float_weights(compute_dtype: torch.dtype) -> None:
    model = _qdora(compute_dtype)
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plain = pk.unload(model, merge=True, dequantize=True)
    assert not any(isinstance(m, (Linear4bit, DoRALinear)) for m in plain.modules())
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    tol = 1e-4 if compute_dtype == torch.float32 else 2e-2  # bf16 compute rounds the adapted forward
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_qdora_adapter_loads_in_hf_peft_on_the_unquantized_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _qdora(steps=5)
    pk.save_adapter(model, tmp_path / "qdora")
    config = json.loads((tmp_path / "qdora" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    safetensors = pytest.importorskip("safetensors.torch")
    keys = safetensors.load_file(tmp_path / "qdora" / "adapter_model.safetensors")
    assert sum(k.endswith("lora_magnitude_vector") for k in keys) == 8
    assert not any("absmax" in k or "qweight" in k or k.endswith("base_layer.weight") for k in keys)

    hf = peft.PeftModel.from_pretrained(_llama(), tmp_path / "qdora").eval()
    ours_float = pk.load_adapter(_llama(), tmp_path / "qdora")
    ids = _ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = hf(input_ids=ids).logits
        torch.testing.assert_close(ours_float(input_ids=ids).logits, theirs, atol=1e-5, rtol=1e-5)
        with hf.disable_adapter():
            base_only = hf(input_ids=ids).logits
    # only the 4-bit base differs: close, and much closer than the base without the adapter
    assert (ours - theirs).abs().mean() < 0.1 * theirs.abs().mean()
    assert (ours - theirs).abs().mean() < 0.5 * (ours - base_only).abs().mean()
