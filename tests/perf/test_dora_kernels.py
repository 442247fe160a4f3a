"""The DoRA fast path against the straightforward formula, outputs and gradients.

Dropout 0 is HF PEFT's formula (checked against HF PEFT itself); with dropout, peftkit drops out the adapter
branch's input only: ``g ⊙ (Wx + s·BA dropout(x)) + b``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.perf.shared import Replay, assert_matches_hf, dora_llama, llama
from torch import nn

from peftkit.methods import lora_dropout, lora_groups, lora_kernels
from peftkit.methods.dora import DoRALinear


def reference(x: torch.Tensor, m: torch.Tensor, A: torch.Tensor, B: torch.Tensor, W: torch.Tensor,
              b: torch.Tensor | None, norm: torch.Tensor, s: float, keep: torch.Tensor | None,
              p: float) -> torch.Tensor:
    """``g ⊙ (Wx + s·BAd) + b`` with ``d`` the dropped-out input and ``g = m/‖·‖`` (HF PEFT's DoRA when d = x)."""
    d = x if keep is None else x * keep / (1 - p)
    g = m / norm
    out = g * (x @ W.T + (d @ A.T @ B.T) * s)
    return out if b is None else out + b


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_against_reference(dropout: float, bias: bool) -> None:
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    x = torch.randn(6, 5, **f64, requires_grad=True)
    m = torch.rand(3, **f64).add(0.5).requires_grad_(True)
    A = torch.randn(2, 5, **f64, requires_grad=True)
    B = torch.randn(3, 2, **f64, requires_grad=True)
    W, b = torch.randn(3, 5, **f64), (torch.randn(3, **f64) if bias else None)
    norm = torch.rand(3, **f64).add(1.0)
    keep = torch.rand(6, 5) > dropout if dropout else None

    def fast(x: torch.Tensor, m: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return lora_kernels.DoRALinearFn.apply(x, m, A, B, W, b, norm, 1.5, keep, dropout)

    def ref(x: torch.Tensor, m: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return reference(x, m, A, B, W, b, norm, 1.5, keep, dropout)

    assert torch.allclose(fast(x, m, A, B), ref(x, m, A, B), atol=1e-12)
    g = torch.randn(6, 3, **f64)
    for a, r in zip(torch.autograd.grad(fast(x, m, A, B), (x, m, A, B), g),
                    torch.autograd.grad(ref(x, m, A, B), (x, m, A, B), g), strict=True):
        assert torch.allclose(a, r, atol=1e-10)
    assert torch.autograd.gradcheck(fast, (x, m, A, B))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_fast_path_matches_straightforward_path(dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout 0: same loss and gradients. Dropout > 0: fed the fast path's masks, the straightforward path agrees."""
    model = dora_llama(dropout)
    slow = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    masks: dict[int, torch.Tensor] = {}
    real = lora_kernels.dropout_input

    def recording(x: torch.Tensor, p: float, name: str = "", owner: object | None = None) -> tuple[torch.Tensor, ...]:
        keep, dropped = real(x, p, name, owner)
        masks[id(owner)] = keep
        return keep, dropped

    monkeypatch.setattr(lora_kernels, "dropout_input", recording)
    fast_loss = model(input_ids=ids, labels=ids).loss
    fast_loss.backward()
    fast_layers = dict(model.named_modules())
    with monkeypatch.context() as m:
        m.setattr(lora_groups, "fused_forward", lambda *a, **k: None)
        for qualname, layer in slow.named_modules():  # the straightforward path's dropout, fed the same masks
            if isinstance(layer, DoRALinear) and isinstance(layer.lora_dropout["default"], nn.Dropout):
                p = layer.lora_dropout["default"].p
                layer.lora_dropout["default"] = Replay(masks[id(fast_layers[qualname])], p)
        slow_loss = slow(input_ids=ids, labels=ids).loss
        slow_loss.backward()
    assert len(masks) == (14 if dropout else 0)  # every DoRA layer drew or shared a mask
    assert torch.allclose(fast_loss, slow_loss, atol=1e-5)
    fast_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    slow_grads = {n: p.grad for n, p in slow.named_parameters() if p.requires_grad}
    assert fast_grads.keys() == slow_grads.keys() and any("magnitude" in n for n in fast_grads)
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, slow_grads[name], atol=1e-5, rtol=1e-4), name


def test_dropout_leaves_the_base_term_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every input element dropped, a DoRA layer in training outputs g ⊙ Wx + b on both paths."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(6, 4).requires_grad_(False))
    layer.add("default", 2, 4.0, dropout=0.5)
    layer.add_magnitude("default")
    layer.set_active(["default"])
    nn.init.normal_(layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    x = torch.randn(3, 6)
    g = (layer.lora_magnitude_vector["default"] / layer.weight_norm("default")).detach()
    expected = g * (x @ layer.base_layer.weight.T) + layer.base_layer.bias
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda shape, p, device: torch.zeros(shape, dtype=torch.bool))
    fast = layer(x)
    monkeypatch.setattr(lora_groups, "fused_forward", lambda *a, **k: None)
    layer.lora_dropout["default"] = Replay(torch.zeros(3, 6, dtype=torch.bool), 0.5)
    slow = layer(x)
    assert torch.allclose(fast, expected, atol=1e-6) and torch.allclose(slow, expected, atol=1e-6)


def test_fast_path_matches_hf_peft_dora_outputs_and_gradients() -> None:
    peft = pytest.importorskip("peft")
    model = dora_llama()
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, DoRALinear)})
    hf = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    assert_matches_hf(model, hf, _hf_key, rtol=1e-4)


def _hf_key(key: str) -> str:
    """HF PEFT keeps the magnitude in a module (``….lora_magnitude_vector.default.weight``)."""
    return key + ".weight" if ".lora_magnitude_vector." in key else key


def test_inference_without_grad_matches_training_path() -> None:
    model = dora_llama().eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        no_grad = model(input_ids=ids).logits
    assert torch.allclose(model(input_ids=ids).logits, no_grad, atol=1e-6)


def test_inference_caches_the_factor_until_magnitude_or_factors_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gradients g = m/‖·‖ is cached; changing m in place or B (hence the norm) is seen at once."""
    model = dora_llama().eval()
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    slow = copy.deepcopy(model)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = model(input_ids=ids).logits
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(lora_groups, "fused_forward", lambda *a, **k: None)
            return fast, slow(input_ids=ids).logits

    for change in (None, "magnitude", "B"):
        with torch.no_grad():
            for layer in (q, slow.get_submodule("model.layers.0.self_attn.q_proj")):
                if change == "magnitude":
                    layer.lora_magnitude_vector["default"].mul_(1.5)
                elif change == "B":
                    layer.lora_B["default"].weight.add_(0.5)
        fast, ref = both()
        assert torch.allclose(fast, ref, atol=1e-5), change
        assert torch.allclose(fast, both()[0], atol=0)  # a cache hit gives the same numbers
