"""Adapters on bitsandbytes' own quantized linears (as ``from_pretrained`` with a ``BitsAndBytesConfig`` builds them),
on its CPU backend: the weight LoRA/DoRA read is the dequantized one, merging writes new codes."""

from __future__ import annotations

import warnings
from types import ModuleType

import pytest
import torch
from torch import nn

import peftkit as pk

bnb: ModuleType = pytest.importorskip("bitsandbytes", reason="bitsandbytes (optional test dep) absent")


def _float() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 32)


def _int8(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.Sequential(layer.to("cpu"))


def _dequantized(layer: nn.Module) -> torch.Tensor:
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb).float()


@pytest.mark.parametrize("forward_first", [False, True])  # the row scales move from the weight to the state
def test_lora_merges_into_linear8bitlt(forward_first: bool) -> None:
    linear = _float()
    model = _int8(linear)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    if forward_first:
        model(x)
    w0 = _dequantized(model[0])
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=4, alpha=8, init_B="gaussian"))
    delta = model[0].delta_weight("default").detach()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(expected, model[0].base_layer(x) + x @ delta.T)
    pk.merge(model)
    codes, scales, _ = bnb.functional.int8_vectorwise_quant((w0 + delta).half())  # Int8Params goes through fp16
    base = model[0].base_layer
    assert torch.equal(base.weight.data, codes)  # requantized from the dequantized weight plus ΔW
    torch.testing.assert_close(_dequantized(base), bnb.functional.int8_vectorwise_dequant(codes, scales).float())
    error = (_dequantized(base) - (w0 + delta)).abs().max()
    assert model[0].merge_errors["default"] == pytest.approx(float(error))
    with torch.no_grad():
        merged = model(x)
    assert (merged - expected).abs().max() < 0.1 * (x @ delta.T).abs().max()  # ΔW is in, up to the rounding
    plain = pk.unload(model, merge=False, dequantize=True)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain[0].weight, _dequantized(base))


def test_dora_magnitude_is_the_dequantized_row_norm() -> None:
    model = _int8(_float())
    w0 = _dequantized(model[0])
    pk.apply(model, pk.DoRA(target_modules=["0"], rank=4))
    torch.testing.assert_close(model[0].lora_magnitude_vector["default"].detach(), w0.norm(dim=1))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # B = 0: DoRA starts as the identity
        torch.testing.assert_close(model(x), model[0].base_layer(x), rtol=1e-5, atol=1e-5)


def test_zero_update_merge_leaves_linear4bit_codes_alone() -> None:
    """Merging reads the 4-bit weight in fp32, not rounded to the bf16 compute dtype, so a zero ΔW changes nothing."""
    linear = _float()
    kwargs = {"compress_statistics": False, "quant_type": "nf4"}
    layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, **kwargs)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, **kwargs)
    model = nn.Sequential(layer.to("cpu"))
    codes = model[0].weight.data.clone()
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=4))  # B = 0
    pk.merge(model)
    assert torch.equal(model[0].base_layer.weight.data, codes)
    assert model[0].merge_errors["default"] == 0.0


def test_memory_report_counts_bitsandbytes_layers_as_quantized() -> None:
    """Codes and constants (double quantization's too) count as quantized bytes, as for peftkit's own layers."""
    from peftkit.quant import memory_report, quantize

    linear = _float()
    layer = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    for bits, theirs in ((4, nn.Sequential(layer.to("cpu"))), (8, _int8(linear))):
        ours = quantize(nn.Sequential(_float()), bits=bits, skip=())
        mine, report = memory_report(ours), memory_report(theirs)
        assert report.quantized == mine.quantized > 0
        assert report.weights_by_dtype == mine.weights_by_dtype == {"float32": 32 * 4}  # the bias only
