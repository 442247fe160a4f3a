"""4-bit NF4/FP4 quantization: bit-exact parity with bitsandbytes, error bounds, memory, bad input."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from peftkit.errors import ConfigError
from peftkit.quant.nf4 import (
    code_book,
    dequantize_4bit,
    dynamic_code,
    quantize_4bit,
    quantize_dynamic_8bit,
)


@pytest.fixture(scope="module")
def bnbf() -> ModuleType:
    """bitsandbytes.functional, the reference; the parity tests skip when it is not installed."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (optional test dep) absent")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 64), (33, 50), (7, 3), (96, 130)]  # blocks spanning rows, short last block, odd count


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, with -0.0 folded into +0.0 (bnb's C kernel decodes FP4's code 8 as either)."""
    t = t + 0.0
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_code_books_equal_bitsandbytes(bnbf: ModuleType) -> None:
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_book(qt), bnbf.get_4bit_type(qt, device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_bitsandbytes(
    bnbf: ModuleType, quant_type: str, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    # bnb's CPU C kernel is used for block sizes 32 and 64 (it is wrong for larger blocks in bnb 0.50,
    # see test_large_blocks_match_bitsandbytes_reference).
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    for block_size in (32, 64):
        packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type=quant_type)
        mine = quantize_4bit(w, quant_type, block_size, double_quant=False)
        assert torch.equal(mine.data, packed.view(-1))
        assert torch.equal(mine.absmax, state.absmax)
        assert torch.equal(_bits(dequantize_4bit(mine, dtype)), _bits(bnbf.dequantize_4bit(packed, state)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_decoding_bit_exact(bnbf: ModuleType, quant_type: str, dtype: torch.dtype) -> None:
    """Decoding bitsandbytes' own nested state gives bnb's weights bit for bit; our 8-bit constant codes
    are the nearest dynamic codes and agree with bnb's for all but a few near-midpoint constants."""
    torch.manual_seed(1)
    w = (torch.randn(160, 256) * 0.05).to(dtype)  # 640 constants: 3 groups of 256, the last short
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    mine = quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(mine.data, packed.view(-1))
    assert torch.equal(mine.absmax_offset, state.offset)
    assert torch.equal(mine.absmax_scale, state.state2.absmax)
    assert (mine.absmax != state.absmax).float().mean() < 0.01
    mine.absmax = state.absmax  # decode bnb's codes with our arithmetic
    assert torch.equal(_bits(dequantize_4bit(mine, dtype)), _bits(bnbf.dequantize_4bit(packed, state)))


def test_dynamic_8bit_is_nearest_code() -> None:
    torch.manual_seed(2)
    x = torch.randn(3000)
    codes, scales = quantize_dynamic_8bit(x, 256)
    normed = x / torch.nn.functional.pad(scales.repeat_interleave(256), (0, 0))[: x.numel()]
    dist = (normed[:, None] - dynamic_code()[None, :]).abs()
    chosen = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.equal(chosen, dist.min(dim=1).values)


@pytest.mark.parametrize("block_size", [128, 256])
def test_large_blocks_match_bitsandbytes_reference(bnbf: ModuleType, block_size: int) -> None:
    """bnb's pure-PyTorch 4-bit decoder (its reference for odd shapes) agrees with ours bit for bit."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    reference = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", None)
    if reference is None:
        pytest.skip("this bitsandbytes version has no pure-PyTorch 4-bit decoder to compare with")
    w = torch.randn(40, 96)
    packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    mine = quantize_4bit(w, "nf4", block_size, double_quant=False)
    assert torch.equal(mine.data, packed.view(-1))
    ref = reference(packed.view(-1), state.absmax, code_book("nf4"), block_size, w.shape, torch.float32)
    assert torch.equal(dequantize_4bit(mine), ref)


# --- error statistics and bounds (no bitsandbytes needed, but this module skips without it) ---


def test_nf4_error_on_gaussian_weights() -> None:
    """N(0,1) weights, blocks of 64: NF4 mean |error| ≈ 0.073 and RMSE ≈ 0.092 (QLoRA's setting),
    each error at most half the widest code-book gap times the block's absmax, NF4 better than FP4,
    and double quantization costing < 0.5% extra error."""
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    plain = quantize_4bit(w, "nf4", 64, double_quant=False)
    err = dequantize_4bit(plain) - w
    assert 0.070 < err.abs().mean() < 0.076
    assert 0.089 < err.pow(2).mean().sqrt() < 0.095
    half_gap = (code_book("nf4").diff().max() / 2).item()
    bound = plain.absmax.repeat_interleave(64).view_as(w) * half_gap
    assert (err.abs() <= bound * (1 + 1e-6)).all()
    fp4_err = (dequantize_4bit(quantize_4bit(w, "fp4", 64, False)) - w).abs().mean()
    assert err.abs().mean() < 0.8 * fp4_err
    dq_err = (dequantize_4bit(quantize_4bit(w, "nf4", 64, True)) - w).abs().mean()
    assert dq_err < err.abs().mean() * 1.005


def test_zero_weight_and_constant_blocks() -> None:
    w = torch.zeros(4, 64)
    w[1] = 0.5
    assert torch.equal(dequantize_4bit(quantize_4bit(w, "nf4", 64, True)), w)


def test_memory_ratio_nf4_double_quant() -> None:
    w = torch.randn(1024, 1024)
    ratio = quantize_4bit(w, "nf4", 64, True).nbytes() / (w.numel() * 4)
    assert ratio <= 0.135
    assert ratio == pytest.approx(4.127 / 32, rel=1e-3)
    assert quantize_4bit(w, "nf4", 64, False).nbytes() / (w.numel() * 4) == pytest.approx(0.140625)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "int4"}, "quant_type='int4'"),
        ({"block_size": 48}, "block_size=48"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        quantize_4bit(torch.randn(4, 64), **kwargs)  # type: ignore[arg-type]


def test_non_float_refused() -> None:
    with pytest.raises(ConfigError, match="torch.int64"):
        quantize_4bit(torch.arange(64))
