"""Bottleneck adapters: placement per architecture, identity init, formula, merge error, save/load, training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.adapter import BottleneckLayer

from models import ARCHS, build, randomize_adapters, run

ARCH_NAMES = ["llama", "gpt2", "t5", "bert"]
# Sites per placement on the 2-layer test models (T5: encoder + decoder, the decoder with cross-attention).
EXPECTED = {
    ("llama", "houlsby"): 4, ("llama", "pfeiffer"): 2, ("llama", "parallel"): 2,
    ("gpt2", "houlsby"): 4, ("gpt2", "pfeiffer"): 2, ("gpt2", "parallel"): 2,
    ("t5", "houlsby"): 10, ("t5", "pfeiffer"): 4, ("t5", "parallel"): 4,
    ("bert", "houlsby"): 4, ("bert", "pfeiffer"): 2, ("bert", "parallel"): 2,
}


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_placement_identity_init_and_round_trip(arch: str, placement: str, tmp_path) -> None:
    model = build(arch)
    with torch.no_grad():
        base = run(model, arch)
        pk.apply(model, pk.Adapter(placement=placement, bottleneck_size=4, scaling=2.0))
        layers = [layer for _, layer in adapter_layers(model)]
        assert len(layers) == EXPECTED[(arch, placement)]
        assert torch.allclose(run(model, arch), base, atol=1e-6)  # W_up = 0: identity
        randomize_adapters(model)
        adapted = run(model, arch)
        assert not torch.allclose(adapted, base, atol=1e-6)
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.merge(model)
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    loaded = pk.load_adapter(build(arch), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(loaded, arch), adapted)


def test_formula_serial_and_parallel() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    for mode in ("serial", "parallel"):
        layer = BottleneckLayer(base, mode)
        layer.add("a", 2, "tanh", 3.0)
        layer.set_active(["a"])
        nn.init.normal_(layer.adapter_up["a"].weight)
        down, up = layer.adapter_down["a"], layer.adapter_up["a"]
        h = base(x)
        inp = h if mode == "serial" else x
        expected = h + 3.0 * (torch.tanh(inp @ down.weight.T + down.bias) @ up.weight.T + up.bias)
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_sizes_and_parameter_count() -> None:
    model = build("llama")  # hidden 32
    pk.apply(model, pk.Adapter(placement="pfeiffer", reduction_factor=8))
    trainable, _ = pk.count_parameters(model)
    # per site: down 32×4 + 4, up 4×32 + 32; two layers
    assert trainable == 2 * (32 * 4 + 4 + 4 * 32 + 32)


def test_explicit_targets_and_errors() -> None:
    model = build("llama")
    pk.apply(model, pk.Adapter(target_modules=["o_proj"], bottleneck_size=2))
    assert len(list(adapter_layers(model))) == 2
    with pytest.raises(ConfigError, match="placement"):
        pk.Adapter(placement="middle")
    with pytest.raises(ConfigError, match="activation"):
        pk.Adapter(activation="softmax")

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="no adapter placement table"):
        pk.apply(Plain(), pk.Adapter())


def test_two_adapters_and_training_lowers_the_loss() -> None:
    model = build("gpt2")
    pk.apply(model, pk.Adapter(placement="houlsby", bottleneck_size=8), name="a")
    pk.apply(model, pk.Adapter(placement="houlsby", bottleneck_size=4), name="b")
    pk.set_adapter(model, "b")
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    model.train()
    ids = ARCHS["gpt2"].inputs()["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
