"""The cached forward plan (peftkit.core.epoch + lora_kernels.plain_adapter): every state change is seen at once.

Each case changes something about an adapted layer between two forwards and checks the second forward against
the formula ``W x + b + Σ s·B A x`` over the adapters that should be active, computed from the live tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.methods.lora_layers import LoRALinear


def _layer() -> tuple[nn.Module, LoRALinear]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).requires_grad_(False)
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=2, alpha=4))
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=3, alpha=3), name="other")
    layer = model[0]
    assert isinstance(layer, LoRALinear)
    for name in ("default", "other"):
        nn.init.normal_(layer.lora_B[name].weight)
    return model, layer


def expected(layer: LoRALinear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    base = layer.base_layer
    out = x @ base.weight.T + base.bias
    for name in names:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        out = out + layer.scaling[name] * (x.to(A.dtype) @ A.T @ B.T)
    return out


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _check(model: nn.Module, layer: LoRALinear, names: list[str]) -> None:
    with torch.no_grad():
        got = model(X.to(layer.base_layer.weight.dtype))
        want = expected(layer, X.to(layer.base_layer.weight.dtype), names)
    assert torch.allclose(got, want, atol=1e-5)


def _set_other(model: nn.Module, layer: LoRALinear) -> list[str]:
    pk.set_adapter(model, "other")
    return ["other"]


def _both(model: nn.Module, layer: LoRALinear) -> list[str]:
    pk.set_adapter(model, ["default", "other"])
    return ["default", "other"]


def _scaling(model: nn.Module, layer: LoRALinear) -> list[str]:
    layer.scaling["default"] = 5.0
    return ["default"]


def _active_list(model: nn.Module, layer: LoRALinear) -> list[str]:
    layer.active_adapters = ["other"]
    return ["other"]


def _replace_module(model: nn.Module, layer: LoRALinear) -> list[str]:
    layer.lora_B["default"] = nn.Linear(2, 5, bias=False)
    return ["default"]


def _assign_state(model: nn.Module, layer: LoRALinear) -> list[str]:
    model.load_state_dict({"0.lora_A.default.weight": torch.ones(2, 6)}, strict=False, assign=True)
    return ["default"]


def _in_place(model: nn.Module, layer: LoRALinear) -> list[str]:
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(3.0)
    return ["default"]


def _to_double(model: nn.Module, layer: LoRALinear) -> list[str]:
    model.double()
    return ["default"]


def _delete_and_readd(model: nn.Module, layer: LoRALinear) -> list[str]:
    pk.delete_adapter(model, "default")
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=4, alpha=2))
    pk.set_adapter(model, "default")
    nn.init.normal_(layer.lora_B["default"].weight)
    return ["default"]


CHANGES: list[Callable[[nn.Module, LoRALinear], list[str]]] = [
    _set_other, _both, _scaling, _active_list, _replace_module, _assign_state, _in_place, _to_double,
    _delete_and_readd]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.strip("_") for c in CHANGES])
def test_a_change_between_forwards_is_seen(change: Callable[[nn.Module, LoRALinear], list[str]]) -> None:
    model, layer = _layer()
    _check(model, layer, ["default"])  # builds and caches the plan
    names = change(model, layer)
    _check(model, layer, names)


def test_disable_merge_unmerge() -> None:
    model, layer = _layer()
    _check(model, layer, ["default"])
    with pk.disable_adapters(model):
        _check(model, layer, [])
    _check(model, layer, ["default"])
    pk.merge(model, ["default"])
    with torch.no_grad():  # merged: the base weight holds the update, the forward adds nothing
        assert torch.allclose(model(X), layer.base_layer(X), atol=0)
    pk.unmerge(model)
    _check(model, layer, ["default"])


def test_unfreezing_the_base_weight_is_seen_by_autograd() -> None:
    model, layer = _layer()
    model(X).sum().backward()  # plan cached with a frozen base
    layer.base_layer.weight.requires_grad_(True)
    model(X).sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_dropout_follows_train_eval_and_p() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).requires_grad_(False)
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=2, alpha=4, dropout=0.5))
    layer = model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(8, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), expected(layer, x, ["default"]), atol=1e-5)
        model.train()
        assert not torch.allclose(model(x), expected(layer, x, ["default"]), atol=1e-3)  # dropout on
        layer.lora_dropout["default"].p = 0.0  # a plain attribute: read on every call
        assert torch.allclose(model(x), expected(layer, x, ["default"]), atol=1e-5)


def test_parameters_swapped_behind_the_modules_back_are_used() -> None:
    """Offloading hooks (accelerate) assign ``module._parameters[name]`` directly, without any registration."""
    model, layer = _layer()
    _check(model, layer, ["default"])
    base, up = layer.base_layer, layer.lora_B["default"]
    base._parameters["weight"] = nn.Parameter(base.weight.detach() * 2, requires_grad=False)
    up._parameters["weight"] = nn.Parameter(up.weight.detach() + 1)
    _check(model, layer, ["default"])


def test_copies_and_pickles_carry_no_forward_cache() -> None:
    import io

    model, layer = _layer()
    _check(model, layer, ["default"])
    assert "_plan" in layer.__dict__
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a pickle this test wrote itself
    twin = copy.deepcopy(model)
    for other in (loaded, twin):
        assert "_plan" not in other[0].__dict__
        _check(other, other[0], ["default"])
