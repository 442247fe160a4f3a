"""Random sequences of state changes on a LoRA/DoRA Llama: the fast paths (cached plans, sibling groups) stay exact.

After every change, the model's logits are checked against a merged copy (the base model with each active
adapter folded into its weights, ``pk.merge``), and its adapter gradients against a copy that runs every layer
on its own (no groups). Inputs have enough tokens for q/k/v and gate/up to group.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
import torch
from tests.perf.shared import llama
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.methods import lora_groups
from peftkit.methods.lora_layers import LoRALinear

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))  # 48 tokens: groups form


def build(method: str) -> nn.Module:
    model = llama()
    config = pk.DoRA if method == "dora" else pk.LoRA
    pk.apply(model, config(target_modules="all-linear", rank=4, alpha=8))
    pk.apply(model, config(target_modules="all-linear", rank=2, alpha=3), name="b")
    pk.set_adapter(model, "default")
    _perturb(model, random.Random(0))
    return model


def layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _perturb(model: nn.Module, rng: random.Random) -> None:
    """Move every trainable tensor (an optimizer step, in place)."""
    gen = torch.Generator().manual_seed(rng.randrange(10**6))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def _switch(model: nn.Module, rng: random.Random) -> None:
    pk.set_adapter(model, rng.choice([["default"], ["b"], ["default", "b"]]))


def _scaling(model: nn.Module, rng: random.Random) -> None:
    layer = rng.choice(layers(model))
    layer.scaling["default"] = rng.choice([0.5, 2.0, 3.0])


def _dtype(model: nn.Module, rng: random.Random) -> None:
    model.double() if rng.random() < 0.5 else model.float()


def _unfreeze_one_base(model: nn.Module, rng: random.Random) -> None:
    layer = rng.choice(layers(model))
    weight = layer.base_layer.weight
    weight.requires_grad_(not weight.requires_grad)


def _call_one_layer_alone(model: nn.Module, rng: random.Random) -> None:
    layer = rng.choice(layers(model))
    with torch.no_grad():
        layer(torch.randn(2, 24, layer.in_features, dtype=layer.base_layer.weight.dtype))


def _reload_one_factor(model: nn.Module, rng: random.Random) -> None:
    name, tensor = rng.choice([(n, t) for n, t in model.state_dict().items() if ".lora_A.default." in n])
    model.load_state_dict({name: torch.randn_like(tensor)}, strict=False, assign=True)


def _delete_and_readd_b(model: nn.Module, rng: random.Random) -> None:
    dora = any(hasattr(layer, "lora_magnitude_vector") for layer in layers(model))
    active = list(layers(model)[0].active_adapters)
    pk.delete_adapter(model, "b")
    pk.apply(model, (pk.DoRA if dora else pk.LoRA)(target_modules="all-linear", rank=3, alpha=3), name="b")
    pk.set_adapter(model, active)
    model.to(layers(model)[0].lora_A["default"].weight.dtype)
    _perturb(model, rng)


def _add_dora(model: nn.Module, rng: random.Random) -> None:
    """A DoRA adapter next to the LoRA ones (their layers become DoRA layers that keep them as plain LoRA)."""
    if "d" not in get_state(model).configs:
        pk.apply(model, pk.DoRA(target_modules="all-linear", rank=2, alpha=4), name="d")
        model.to(layers(model)[0].lora_A["default"].weight.dtype)
        _perturb(model, rng)
    pk.set_adapter(model, rng.choice(["d", "default"]))


def _merge_round_trip(model: nn.Module, rng: random.Random) -> None:
    pk.merge(model)
    pk.unmerge(model)


def _train_eval(model: nn.Module, rng: random.Random) -> None:
    model.train(rng.random() < 0.5)


OPS: list[Callable[[nn.Module, random.Random], None]] = [
    _perturb, _switch, _scaling, _dtype, _unfreeze_one_base, _call_one_layer_alone, _reload_one_factor,
    _delete_and_readd_b, _merge_round_trip, _train_eval, _add_dora]


def check(model: nn.Module) -> None:
    """Logits equal the merged copy's; adapter gradients equal those of the ungrouped copy.

    (Two DoRA adapters active at once are each normalised against the unmerged weight, as in HF PEFT, which
    merging one after the other does not reproduce: that case is compared with the ungrouped copy only.)
    """
    first = layers(model)[0]
    tol = 1e-4 if first.lora_A["default"].weight.dtype == torch.float32 else 1e-9
    if len(first.active_adapters) == 1 or not hasattr(first, "lora_magnitude_vector"):
        merged = copy.deepcopy(model)
        pk.merge(merged)
        with torch.no_grad():
            got = model(input_ids=IDS).logits
            want = merged(input_ids=IDS).logits
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    alone = copy.deepcopy(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    lora_groups.enabled = False
    try:
        with torch.no_grad():
            want = alone(input_ids=IDS).logits
        alone(input_ids=IDS, labels=IDS).loss.backward()
    finally:
        lora_groups.enabled = True
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, want, atol=tol, rtol=tol)
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    theirs = {n: p.grad for n, p in alone.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and ours
    for name, grad in ours.items():
        assert torch.allclose(grad, theirs[name], atol=tol, rtol=tol), name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_random_state_changes_keep_the_fast_paths_exact(method: str, seed: int) -> None:
    rng = random.Random(seed)
    model = build(method)
    check(model)
    assert sum(lora_groups.group_of(layer) is not None for layer in layers(model)) == 10  # q/k/v, gate/up × 2
    for _ in range(12):
        rng.choice(OPS)(model, rng)
        check(model)
