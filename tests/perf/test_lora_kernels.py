"""The LoRA fast path against the straightforward formula: outputs and gradients (dropout 0), mask law (dropout > 0)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.perf.shared import IDS, assert_matches_hf, llama
from torch import nn

import peftkit as pk
from peftkit.methods import lora_kernels
from peftkit.methods.lora_layers import LoRALinear


def reference(x: torch.Tensor, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, s: float,
              keep: torch.Tensor | None = None, p: float = 0.0) -> torch.Tensor:
    """``base(x) + s·B A dropout(x)`` written out with autograd, the dropout given by an explicit mask."""
    dropped = x if keep is None else x * keep / (1 - p)
    return base(x) + (dropped @ A.T @ B.T) * s


def grads(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_matches_formula_and_gradients_without_dropout(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 7, dtype=dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    A = torch.randn(4, 12, dtype=dtype, requires_grad=True)
    B = torch.randn(7, 4, dtype=dtype, requires_grad=True)
    fast = lora_kernels.lora_update(base(x), x, A, B, 2.5)
    ref = reference(x, base, A, B, 2.5)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=tol)
    for a, b in zip(grads(fast, x, A, B, base.weight), grads(ref, x, A, B, base.weight), strict=True):
        assert torch.allclose(a, b, atol=tol * 10)


def test_gradcheck_with_a_fixed_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    result = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(6, 5) > 0.3
    assert torch.autograd.gradcheck(lambda r, x, A, B: lora_kernels.LoRAUpdate.apply(r, x, A, B, 1.7, keep, 0.3),
                                    (result, x, A, B))
    assert torch.autograd.gradcheck(lambda r, x, A, B: lora_kernels.LoRAUpdate.apply(r, x, A, B, 1.7, None, 0.0),
                                    (result, x, A, B))


def test_dropout_path_equals_formula_with_the_same_mask() -> None:
    """Re-drawing the mask from the same seed reproduces the fast path exactly, gradients included."""
    base = nn.Linear(16, 8)
    x = torch.randn(3, 10, 16, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(8, 4, requires_grad=True)
    torch.manual_seed(7)
    fast = lora_kernels.lora_update(base(x), x, A, B, 0.5, p=0.25, training=True)
    torch.manual_seed(7)
    keep = lora_kernels.keep_mask((30, 16), 0.25).view(3, 10, 16)
    ref = reference(x, base, A, B, 0.5, keep, 0.25)
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(grads(fast, x, A, B), grads(ref, x, A, B), strict=True):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_mask_has_the_dropout_law(p: float) -> None:
    """Keep rate 1-p within 5 standard errors; even/odd halves agree; neighbours are uncorrelated."""
    torch.manual_seed(0)
    n = 2_000_001  # odd: exercises the padding of the last int64 word
    keep = lora_kernels.keep_mask((n,), p).double()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * se
    for half in (keep[0::2], keep[1::2]):
        assert abs(half.mean().item() - (1 - p)) < 5 * se * math.sqrt(2)
    a, b = keep[:-1] - keep.mean(), keep[1:] - keep.mean()
    corr = (a * b).mean() / keep.var()
    assert abs(corr.item()) < 5 / math.sqrt(n)


def test_keep_mask_is_reproducible_and_respects_the_generator() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    m1, m2 = lora_kernels.keep_mask((7, 9), 0.5, generator=g1), lora_kernels.keep_mask((7, 9), 0.5, generator=g2)
    assert m1.shape == (7, 9) and m1.dtype == torch.bool and torch.equal(m1, m2)


def test_dropout_layer_output_has_the_same_law_as_hf_style_dropout() -> None:
    """Per element, the fast path's update is 0 w.p. p and x/(1-p) otherwise, like ``nn.Dropout``."""
    torch.manual_seed(0)
    p = 0.2
    x = torch.ones(400, 500)
    A = torch.eye(500)[:1]           # h = first input column after dropout
    B = torch.ones(1, 1)
    out = lora_kernels.lora_update(torch.zeros(400, 1), x, A, B, 1.0, p=p, training=True)
    values = out.flatten()
    dropped = (values == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / 400)
    assert torch.allclose(values[values != 0], torch.full_like(values[values != 0], 1 / (1 - p)))


def _straightforward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_kernels, "supports", lambda *a: False)


def test_model_level_fast_path_matches_straightforward_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama()
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=4, alpha=8))
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B["default"].weight)
    slow = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    fast_loss = model(input_ids=ids, labels=ids).loss
    fast_loss.backward()
    with monkeypatch.context() as m:
        _straightforward(m)
        slow_loss = slow(input_ids=ids, labels=ids).loss
        slow_loss.backward()
    assert torch.allclose(fast_loss, slow_loss, atol=1e-5)
    fast_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    slow_grads = {n: p.grad for n, p in slow.named_parameters() if p.requires_grad}
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, slow_grads[name], atol=1e-5, rtol=1e-4), name


def test_fast_path_matches_hf_peft_outputs_and_gradients() -> None:
    peft = pytest.importorskip("peft")
    model = llama()
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj", "down_proj"], rank=4, alpha=8))
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B["default"].weight)
    hf = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]))
    assert_matches_hf(model, hf)


def test_dropout_post_and_no_grad_paths_still_work() -> None:
    model = llama()
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=4, alpha=8, dropout=0.1, dropout_position="post"))
    ids = torch.randint(0, 96, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        model.eval()
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_on_a_half_precision_model_infer_as_hf_peft_through_one_plan(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF PEFT's default on a half-precision model (fp32 adapters): inference takes the widened route, with HF PEFT's
    logits; with gradients on it does not."""
    from peftkit.methods import lora_groups

    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = pk.apply(llama().to(dtype), pk.LoRA(target_modules=targets, rank=4, alpha=8)).eval()
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            assert layer.lora_A["default"].weight.dtype == torch.float32
            nn.init.normal_(layer.lora_B["default"].weight)
    hf = peft.get_peft_model(llama().to(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    missing, unexpected = hf.base_model.model.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    served = []
    route = lora_groups.widened_inference

    def counted(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        out = route(layer, x)
        served.extend([] if out is None else [layer])
        return out

    monkeypatch.setattr(lora_groups, "widened_inference", counted)
    with torch.no_grad():
        ours, theirs = model(input_ids=IDS).logits, hf(input_ids=IDS).logits
    assert len(served) == 2 * len(targets)
    # The same order of operations as HF PEFT: equal but for the last bit of a rounding (here, exactly equal).
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=ulp, atol=1e-6)
    model(input_ids=IDS, labels=IDS).loss.backward()  # gradients: the straightforward path
    assert len(served) == 2 * len(targets)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
