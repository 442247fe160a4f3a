"""Quantized linear layers and ``quantize``: forward/backward parity, frozen buffers, requantize, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.errors import ConfigError, MissingDependencyError
from peftkit.quant import Linear4bit, Linear8bit, memory_report, prepare_for_kbit_training, quantize
from peftkit.quant.int8 import dequantize_int8, quantize_int8


def _layers(weight: torch.Tensor, bias: torch.Tensor) -> list[nn.Module]:
    return [
        Linear4bit(weight, bias, compute_dtype=torch.float32),
        Linear4bit(weight, bias, quant_type="fp4", block_size=32, double_quant=False, compute_dtype=torch.float32),
        Linear8bit(weight, bias, compute_dtype=torch.float32),
    ]


def test_forward_and_backward_equal_dense_linear_on_dequantized_weight() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 80), torch.randn(48)
    for layer in _layers(weight, bias):
        w = layer.dequantize()
        assert w.shape == (48, 80) and w.dtype == torch.float32
        x = torch.randn(2, 5, 80, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        y = layer(x)
        y_ref = nn.functional.linear(x_ref, w, bias)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad)
        assert not any(p.requires_grad for p in layer.parameters())
        assert all(not b.requires_grad for b in layer.buffers())


def test_trainable_bias_gets_its_gradient() -> None:
    layer = Linear4bit(torch.randn(8, 64), torch.zeros(8), compute_dtype=torch.float32)
    assert layer.bias is not None
    layer.bias.requires_grad_(True)
    layer(torch.randn(3, 64)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 3.0))


def test_compute_dtype_casts_in_and_out() -> None:
    layer = Linear4bit(torch.randn(8, 64), None, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = nn.functional.linear(x.bfloat16(), layer.dequantize()).float()
    torch.testing.assert_close(y, ref)


def test_half_cast_keeps_constants_exact() -> None:
    layer = Linear4bit(torch.randn(16, 64), torch.randn(16), compute_dtype=torch.float32)
    before = layer.dequantize()
    layer.half()
    assert layer.bias is not None and layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantize(), before)


def test_requantize_merges_and_reports_error() -> None:
    torch.manual_seed(1)
    for layer in _layers(torch.randn(32, 64), torch.randn(32)):
        delta = 0.1 * torch.randn(32, 64)
        target = layer.dequantize() + delta
        err = layer.requantize(target)
        assert err == pytest.approx((layer.dequantize() - target).abs().max().item())
        assert 0 < err < 0.5
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        layer.requantize(torch.zeros(3, 3))


def test_state_dict_round_trip() -> None:
    a = Linear4bit(torch.randn(16, 64), torch.randn(16))
    b = Linear4bit(torch.randn(16, 64), torch.randn(16))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())


def test_int8_matches_bitsandbytes() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (optional test dep) absent")
    w = torch.randn(40, 70)
    codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
    p = quantize_int8(w)
    assert torch.equal(p.data, codes) and torch.equal(p.row_absmax, stats)
    torch.testing.assert_close(dequantize_int8(p), bnbf.int8_vectorwise_dequant(codes, stats), rtol=2e-7, atol=0)


def test_memory_ratios_from_tensor_sizes() -> None:
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 256, bias=False))
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    quantize(model, skip=())
    assert memory_report(model).quantized / fp32 <= 0.135
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 256, bias=False))
    quantize(model, bits=8, skip=())
    assert memory_report(model).quantized / fp32 <= 0.26


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 50)
        self.proj = nn.Linear(50, 30)  # 50 in-features: blocks of 64 span rows
        self.norm = nn.LayerNorm(30)
        self.attn = nn.MultiheadAttention(30, 2)
        self.lm_head = nn.Linear(30, 10)


def test_quantize_replaces_linears_but_skips_head_and_attention_internals() -> None:
    net = _Net()
    quantize(net)
    assert isinstance(net.proj, Linear4bit)
    assert type(net.lm_head) is nn.Linear and type(net.attn.out_proj) is not Linear4bit
    net2 = _Net()
    quantize(net2, bits=8, skip=("lm*",))
    assert isinstance(net2.proj, Linear8bit) and type(net2.lm_head) is nn.Linear


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits=3"),
        ({"quant_type": "nf3"}, "quant_type='nf3'"),
        ({"block_size": 100}, "block_size=100"),
        ({"backend": "gptq"}, "backend='gptq'"),
        ({"skip": ("proj", "lm_head", "out_proj")}, "no nn.Linear layer to quantize"),
        ({"skip": ("lm_hed",)}, r"skip pattern 'lm_hed' matches no module of this model \(close: \['lm_head'"),
        ({"skip": ("lm_head", "layers.*")}, "skip pattern 'layers.*' matches no module"),
        ({"compute_dtype": torch.int8}, "compute_dtype=torch.int8 is not supported"),
        ({"compute_dtype": "bfloat16"}, "compute_dtype='bfloat16' is not supported; use torch.float32"),
        ({"bits": 8, "quant_type": "fp4"}, "quant_type='fp4' and block_size=64 apply to bits=4 only"),
        ({"bits": 8, "block_size": 128}, "block_size=128 apply to bits=4 only"),
    ],
)
def test_quantize_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    net = _Net()
    with pytest.raises(ConfigError, match=message):
        quantize(net, **kwargs)  # type: ignore[arg-type]
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in net.modules())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_before_any_layer_changes(bits: int, bad: float) -> None:
    net = _Net()
    with torch.no_grad():
        net.lm_head.weight[3, 5] = bad
    with pytest.raises(ConfigError, match=r"layer 'lm_head' has 1 non-finite weight\(s\) \(NaN or Inf\)"):
        quantize(net, bits=bits, skip=())
    assert type(net.proj) is nn.Linear and type(net.lm_head) is nn.Linear
    quantize(net, bits=bits)  # the default keeps lm_head in float


def test_skip_as_one_string_is_one_pattern() -> None:
    net = quantize(_Net(), skip="lm_head")
    assert isinstance(net.proj, Linear4bit) and type(net.lm_head) is nn.Linear
    net = quantize(_Net(), skip="proj")
    assert type(net.proj) is nn.Linear and isinstance(net.lm_head, Linear4bit)


def test_quantize_twice_is_an_error() -> None:
    net = quantize(_Net())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(net)


def test_an_adapted_model_quantizes_its_bases_and_keeps_the_factors_trainable() -> None:
    import peftkit as pk
    from peftkit.methods.lora_layers import LoRALinear

    net = pk.apply(_Net(), pk.LoRA(target_modules=["proj"]))
    quantize(net)
    layer = net.proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    assert all(type(m) is nn.Linear for m in (layer.lora_A["default"], layer.lora_B["default"]))
    assert pk.count_parameters(net)[0] == 8 * (50 + 30)  # rank 8: A and B, still trainable
    out = layer(torch.randn(3, 50))
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_non_float_layer_refused() -> None:
    net = _Net()
    net.proj.weight = nn.Parameter(net.proj.weight.data.to(torch.int32), requires_grad=False)
    with pytest.raises(ConfigError, match="'proj'.*torch.int32"):
        quantize(net)


def test_bitsandbytes_backend_needs_gpu_or_package() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises((ConfigError, MissingDependencyError), match="GPU|bitsandbytes"):
        quantize(_Net(), backend="bitsandbytes")


def test_prepare_for_kbit_training() -> None:
    net = quantize(_Net().to(torch.bfloat16))
    prepare_for_kbit_training(net)
    assert all(not p.requires_grad for p in net.parameters())
    assert net.norm.weight.dtype == torch.float32 and net.embed.weight.dtype == torch.float32
    assert net.embed(torch.tensor([1, 2])).requires_grad  # input grads for gradient checkpointing
    net2 = prepare_for_kbit_training(quantize(_Net().to(torch.bfloat16)), upcast="norms")
    assert net2.norm.weight.dtype == torch.float32 and net2.embed.weight.dtype == torch.bfloat16
