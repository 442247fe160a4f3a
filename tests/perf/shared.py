"""Models and helpers the fast-path tests share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import peftkit as pk
from peftkit.methods.dora import DoRALinear

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def llama(layers: int = 2) -> nn.Module:
    """A tiny random Llama with grouped-query attention (k/v narrower than q)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def dora_llama(dropout: float = 0.0) -> nn.Module:
    """:func:`llama` with DoRA on every linear layer, B and the magnitudes moved off their initial values."""
    model = llama()
    pk.apply(model, pk.DoRA(target_modules="all-linear", rank=4, alpha=8, dropout=dropout))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DoRALinear):
                layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
                layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.rand(layer.out_features, generator=gen))
    return model


class Replay(nn.Module):
    """A dropout layer that applies a recorded keep-mask."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.keep.view(x.shape) != 0) / (1 - self.p)


def assert_matches_hf(model: nn.Module, hf: nn.Module, key: Callable[[str], str] = lambda k: k,
                      rtol: float = 1e-5) -> None:
    """Load ``model``'s adapter into the HF PEFT model ``hf``; equal logits, then equal adapter gradients.

    Args:
        key: maps a peftkit state-dict key to HF PEFT's.
    """
    ours_state = {key(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.base_model.model.load_state_dict(ours_state, strict=False)
    assert not missing and not unexpected
    ours, theirs = model(input_ids=IDS, labels=IDS), hf(input_ids=IDS, labels=IDS)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    hf_grads = {n.removeprefix("base_model.model."): p.grad for n, p in hf.named_parameters() if p.requires_grad}
    ours_grads = {key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == hf_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, hf_grads[name], atol=1e-5, rtol=rtol), name
