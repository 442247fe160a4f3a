"""DoRA on nn.Conv1d/2d/3d: identity at init, HF PEFT parity both ways on disk (outputs and gradients), exact
merge/unmerge/unload, dropout on the adapter branch only, grouped convolutions refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import UnsupportedLayerError
from peftkit.methods.dora import DoRAConv

from models import perturb_dora

TARGETS = ["c1", "c2", "c3"]


class ConvNet(nn.Module):
    """A Conv1d, a strided Conv2d and a Conv3d with a non-cubic kernel, read in sequence."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, kernel_size=3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, bias=bias)
        self.c3 = nn.Conv3d(6, 5, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))                           # (b, 4, 64)
        h = torch.tanh(self.c2(h.view(-1, 4, 8, 8)))         # (b, 6, 4, 4)
        return self.c3(h.unsqueeze(2))                       # (b, 5, 1, 4, 4)


def _model(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet(bias)
    if bias:  # nonzero biases, so subtracting the bias from the base output is really tested
        with torch.no_grad():
            for conv in (model.c1, model.c2, model.c3):
                conv.bias.normal_()
    return model.eval()


X = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the adapter tensors, under names both libraries share (HF's ``….default.weight`` magnitude and
    ``base_model.model.`` prefix dropped)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reached {name}"
            key = name.removeprefix("base_model.model.")
            out[key.removesuffix(".weight") if "magnitude" in key else key] = p.grad
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_fresh_adapter_is_identity_with_hf_magnitude_shapes(bias: bool) -> None:
    base = _model(bias)
    model = pk.apply(copy.deepcopy(base), pk.DoRA(target_modules=TARGETS, rank=2, alpha=4))
    layers = dict(adapter_layers(model))
    assert {type(layer) for layer in layers.values()} == {DoRAConv}
    shapes = {name: tuple(layer.lora_magnitude_vector["default"].shape) for name, layer in layers.items()}
    assert shapes == {"c1": (1, 4, 1), "c2": (1, 6, 1, 1), "c3": (1, 5, 1, 1, 1)}  # HF PEFT's layout
    for layer in layers.values():  # m = ‖W‖ per output channel
        W = layer.base_layer.weight
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].flatten(), W.flatten(1).norm(dim=1))
    torch.testing.assert_close(model(X), base(X), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_hf_peft_adapter_loads_with_equal_outputs(bias: bool, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(_model(bias), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True))
    perturb_dora(hf)
    hf.eval()
    hf.save_pretrained(tmp_path)
    model = pk.load_adapter(_model(bias), tmp_path)
    assert {type(layer) for _, layer in adapter_layers(model)} == {DoRAConv}
    expected = hf(X)
    assert (expected - _model(bias)(X)).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(model(X), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_peftkit_adapter_loads_in_hf_peft_with_equal_outputs_and_gradients(bias: bool, tmp_path: Path) -> None:
    import json

    from peft import PeftModel

    model = pk.apply(_model(bias), pk.DoRA(target_modules=TARGETS, rank=3, alpha=6, use_rslora=True))
    perturb_dora(model, seed=1)
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    hf = PeftModel.from_pretrained(_model(bias), tmp_path, is_trainable=True).eval()
    ours, theirs = model(X), hf(X)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    mine, reference = _grads(model), _grads(hf)
    assert set(mine) == set(reference) and len(mine) == 9  # A, B and magnitude of each conv
    for name in mine:
        assert mine[name].abs().max() > 0, name
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_merge_equals_unmerged_and_unmerge_restores(bias: bool) -> None:
    model = pk.apply(_model(bias), pk.DoRA(target_modules=TARGETS, rank=2, alpha=4))
    perturb_dora(model)
    unmerged = model(X).detach()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    pk.merge(model)
    torch.testing.assert_close(model(X), unmerged, rtol=0, atol=1e-5)
    pk.unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(X), unmerged, rtol=0, atol=1e-6)
    plain = pk.unload(model, merge=True)
    assert {type(m) for m in (plain.c1, plain.c2, plain.c3)} == {nn.Conv1d, nn.Conv2d, nn.Conv3d}
    torch.testing.assert_close(plain(X), unmerged, rtol=0, atol=1e-5)


def test_delta_weight_is_the_merged_change() -> None:
    model = pk.apply(_model(True), pk.DoRA(target_modules=["c2"], rank=2, alpha=4))
    perturb_dora(model)
    layer = model.c2
    before = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    pk.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, before + delta, rtol=0, atol=1e-6)


def test_dropout_acts_on_the_adapter_branch_only() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    model = pk.apply(nn.Sequential(base), pk.DoRA(target_modules=["0"], rank=2, alpha=4, dropout=0.5))
    perturb_dora(model)
    layer = model[0]
    layer.train()
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    W = base.weight
    m = layer.lora_magnitude_vector["default"].flatten()
    g = (m / (W + layer.scaling["default"] * torch.einsum("or,ri...->oi...", B.weight.flatten(1), A.weight))
         .flatten(1).norm(dim=1)).view(-1, 1, 1)
    # y = g ⊙ (conv(x, W) + s·B A dropout(x)) + b: the base term sees the clean input
    expected = g * (F.conv2d(x, W, padding=1) + layer.scaling["default"] * B(A(dropped))) + base.bias.view(-1, 1, 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_grouped_conv_is_refused_before_the_model_changes() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, kernel_size=3, groups=2), nn.Conv2d(6, 6, kernel_size=1))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*groups=2.*groups=1.*exclude_modules"):
        pk.apply(model, pk.DoRA(target_modules=["0", "1"], rank=2))
    assert type(model[1]) is nn.Conv2d  # nothing was wrapped
    pk.apply(model, pk.DoRA(target_modules=["0", "1"], exclude_modules=["0"], rank=2))
    assert type(model[0]) is nn.Conv2d and type(model[1]) is DoRAConv


def test_unbatched_input_matches_batched() -> None:
    model = pk.apply(_model(True), pk.DoRA(target_modules=TARGETS, rank=2, alpha=4))
    perturb_dora(model)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.c2(x[0]), model.c2(x)[0], rtol=0, atol=1e-6)
