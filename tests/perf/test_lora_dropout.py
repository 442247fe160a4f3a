"""Dropout masks of the LoRA kernels: their law, how they are applied, and sharing among sibling projections."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.perf.shared import Replay, llama
from torch import nn

import peftkit as pk
from peftkit.methods import lora_dropout, lora_kernels
from peftkit.methods.lora_layers import LoRALinear


@pytest.mark.parametrize("p", [0.001, 0.05])
def test_keep_mask_law_on_both_bit_widths(p: float) -> None:
    """p=0.05 uses 15 bits per element, p=0.001 (not representable to 2⁻¹⁰ in 15 bits) 31/32 bits."""
    torch.manual_seed(1)
    n = 1_000_003
    keep = lora_dropout.keep_mask((n,), p).double()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * se
    for slot in range(4):  # every position of a 64-bit random word has the same law
        part = keep[slot::4]
        assert abs(part.mean().item() - (1 - p)) < 5 * se * 2


def test_keep_mask_drops_exactly_the_quantized_probability() -> None:
    """15-bit slots below round(p·2¹⁵) are dropped: with p = 0.5 exactly half of all slot values."""
    torch.manual_seed(2)
    keep = lora_dropout.keep_mask((4, 5, 3), 0.5)
    assert keep.shape == (4, 5, 3) and keep.dtype == torch.bool
    torch.manual_seed(2)
    words = torch.empty(15, dtype=torch.int64).random_().bitwise_and_(0x7FFF_7FFF_7FFF_7FFF)
    assert torch.equal(keep.flatten(), (words.view(torch.int16) >= 2**14)[:60])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_apply_keep_equals_where(dtype: torch.dtype) -> None:
    x = torch.randn(7, 9).to(dtype)
    keep = torch.rand(7, 9) > 0.3
    expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
    assert torch.equal(lora_dropout.apply_keep(x, keep), expected)
    assert torch.equal(lora_dropout.apply_keep(x, keep.to(torch.int8).neg()), expected)  # int8 -1/0 form
    y = x.clone()
    assert lora_dropout.apply_keep_(y, keep) is y and torch.equal(y, expected)


def test_siblings_called_with_the_same_input_share_one_mask() -> None:
    x, other = torch.randn(4, 8), torch.randn(4, 8)
    q, k, o = object(), object(), object()
    keep_q, dropped_q = lora_dropout.dropout_input(x, 0.3, "default", q)
    keep_k, dropped_k = lora_dropout.dropout_input(x, 0.3, "default", k)
    assert keep_k is keep_q and dropped_k is dropped_q
    assert keep_q.dtype == torch.int8 and set(keep_q.unique().tolist()) <= {-1, 0}
    assert torch.equal(dropped_q, torch.where(keep_q != 0, x, 0.0))
    keep_again, _ = lora_dropout.dropout_input(x, 0.3, "default", q)  # the same layer again: a new mask
    assert keep_again is not keep_q
    assert lora_dropout.dropout_input(other, 0.3, "default", o)[0] is not keep_again
    assert lora_dropout.dropout_input(x, 0.3, "default", None)[0] is not keep_again  # no owner: never shared
    x.add_(1.0)  # changed in place: a new mask
    assert lora_dropout.dropout_input(x, 0.3, "default", k)[0] is not keep_again


def test_model_masks_are_shared_per_input_and_the_straightforward_path_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v and gate/up share a mask, o and down have their own; fed those masks, the plain path agrees."""
    model = llama()
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=4, alpha=8, dropout=0.2))
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B["default"].weight)
    slow = copy.deepcopy(model)
    masks: dict[str, torch.Tensor] = {}
    owners = {id(m): n for n, m in model.named_modules()}
    real = lora_kernels.dropout_input

    def recording(x: torch.Tensor, p: float, name: str = "", owner: object | None = None) -> tuple[torch.Tensor, ...]:
        keep, dropped = real(x, p, name, owner)
        masks[owners[id(owner)]] = keep
        return keep, dropped

    monkeypatch.setattr(lora_kernels, "dropout_input", recording)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    fast_loss = model(input_ids=ids, labels=ids).loss
    fast_loss.backward()
    layer0 = "model.layers.0."
    attn, mlp = layer0 + "self_attn.", layer0 + "mlp."
    assert masks[attn + "q_proj"] is masks[attn + "k_proj"] is masks[attn + "v_proj"]
    assert masks[mlp + "gate_proj"] is masks[mlp + "up_proj"]
    distinct = {id(masks[n]) for n in (attn + "q_proj", attn + "o_proj", mlp + "gate_proj", mlp + "down_proj")}
    assert len(distinct) == 4 and len(masks) == 14
    for qualname, layer in slow.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_dropout["default"] = Replay(masks[qualname], 0.2)
    with monkeypatch.context() as m:
        m.setattr(lora_kernels, "supports", lambda *a: False)
        slow_loss = slow(input_ids=ids, labels=ids).loss
        slow_loss.backward()
    assert torch.allclose(fast_loss, slow_loss, atol=1e-5)
    slow_grads = dict(slow.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, slow_grads[name].grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("method", [pk.LoRA, pk.DoRA])
def test_a_training_step_draws_one_mask_per_distinct_input(method: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per decoder layer: the attention input (q, k, v), o's input, the MLP input (gate, up) and down's input."""
    model = llama()
    pk.apply(model, method(target_modules="all-linear", rank=4, alpha=8, dropout=0.1))
    calls = []
    real = lora_dropout.keep_mask

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[0])
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lora_dropout, "keep_mask", counting)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 4 * 2
