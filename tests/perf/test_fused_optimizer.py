"""Optimizers that write parameters without moving their version counters (``AdamW(fused=True)``, the default of
``transformers.Trainer``): nothing the fast paths keep between calls may go stale."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.perf.shared import IDS, llama
from torch import nn

import peftkit as pk
from peftkit.methods import lora_groups


def _steps(model: nn.Module, fused: bool = True, steps: int = 3) -> list[torch.Tensor]:
    """Losses of ``steps`` AdamW steps, then the model's logits in evaluation."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=fused)
    out = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.detach())
    with torch.no_grad():
        out.append(model.eval()(input_ids=IDS).logits)
    return out


def test_fused_optimizer_steps_reach_grouped_siblings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The siblings' concatenated down-projection follows every fused step, as it follows the steps of the
    foreach AdamW (which moves version counters). A stale one (the first step's A) was 0.4 off in the logits;
    the two optimizers themselves round differently, which three steps at this rate amplify to about 3e-4."""
    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)
    model = llama()
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=4, alpha=8, init_B="gaussian"))
    plain = copy.deepcopy(model)
    fused = _steps(model)
    assert lora_groups.group_of(model.get_submodule("model.layers.0.self_attn.q_proj")) is not None
    for got, want in zip(fused, _steps(plain, fused=False), strict=True):
        assert torch.allclose(got, want, atol=5e-3), (got - want).abs().max()


@pytest.mark.parametrize("grouping", [True, False])
def test_fused_optimizer_steps_reach_dora_norms(monkeypatch: pytest.MonkeyPatch, grouping: bool) -> None:
    """DoRA's cached ‖W + sBA‖ follows every step, in training and in evaluation after it: HF PEFT's DoRA, which
    recomputes the norm on every call, trains and evaluates to the same numbers."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)
    monkeypatch.setattr(lora_groups, "enabled", grouping)
    model = llama()
    hf = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         use_dora=True, init_lora_weights="gaussian"))
    pk.apply(model, pk.DoRA(target_modules="all-linear", rank=4, alpha=8))
    with torch.no_grad():  # the same starting factors (B moved off zero so that A trains from the first step)
        gen = torch.Generator().manual_seed(3)
        hf_params = dict(hf.named_parameters())
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                hf_name = name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")
                hf_params["base_model.model." + hf_name].copy_(p)
    ours, theirs = _steps(model), _steps(hf)
    for got, want in zip(ours, theirs, strict=True):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
