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

from models import ARCHS, build, randomize_adapters, run, train_losses

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
        layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, BottleneckLayer)]
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

    with pytest.raises(ConfigError, match=r"pk\.register_architecture\("):
        pk.apply(Plain(), pk.Adapter())


def test_two_adapters_and_training_lowers_the_loss() -> None:
    model = build("gpt2")
    pk.apply(model, pk.Adapter(placement="houlsby", bottleneck_size=8), name="a")
    pk.apply(model, pk.Adapter(placement="houlsby", bottleneck_size=4), name="b")
    pk.set_adapter(model, "b")
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    model.train()
    ids = ARCHS["gpt2"].inputs()["input_ids"]
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.01)
    assert losses[-1] < losses[0] - 0.05


class TinyAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wqkv, self.wo = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wqkv(x).chunk(3, dim=-1)
        return self.wo(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)


class TinyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.relu(self.fc_in(x)))


class TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(d), TinyAttention(d), nn.LayerNorm(d), TinyMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyFormer(nn.Module):
    """A user's own transformer: no transformers class, just a ``config.model_type`` for the role table."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "tinyformer"})()
        self.embed = nn.Embedding(50, d)
        self.blocks = nn.ModuleList([TinyBlock(d), TinyBlock(d)])
        self.head = nn.Linear(d, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


TINY_ROLES = {"linear_qkv": ["attn.wqkv"], "linear_proj": ["attn.wo"], "linear_fc1": ["mlp.fc_in"],
              "linear_fc2": ["mlp.fc_out"]}


@pytest.fixture
def tinyformer():
    from peftkit.methods.roles import ARCHITECTURES

    pk.register_architecture("tinyformer", roles=TINY_ROLES)
    yield lambda: (torch.manual_seed(0), TinyFormer().eval())[1]
    ARCHITECTURES.pop("tinyformer", None)


def test_registered_architecture_gets_houlsby_adapters(tinyformer, tmp_path) -> None:
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    model = tinyformer()
    with torch.no_grad():
        base = model(ids)
        pk.apply(model, pk.Adapter(placement="houlsby", bottleneck_size=4))
        assert [n for n, _ in adapter_layers(model)] == [
            "blocks.0.attn.wo", "blocks.0.mlp.fc_out", "blocks.1.attn.wo", "blocks.1.mlp.fc_out"]
        assert torch.allclose(model(ids), base, atol=1e-6)
        randomize_adapters(model)
        adapted = model(ids)
        # The serial formula at one site: wo(x) + A(wo(x)).
        layer = model.blocks[0].attn.wo
        x = torch.randn(3, 16)
        h = layer.base_layer(x)
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        assert torch.allclose(layer(x), h + up(torch.relu(down(h))), atol=1e-6)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(tinyformer(), tmp_path)  # the saved targets are exact names
    with torch.no_grad():
        assert torch.equal(loaded(ids), adapted)


def test_registered_architecture_parallel_and_pfeiffer_sites(tinyformer) -> None:
    model = pk.apply(tinyformer(), pk.Adapter(placement="parallel", bottleneck_size=2), name="par")
    assert [n for n, _ in adapter_layers(model)] == ["blocks.0.mlp", "blocks.1.mlp"]
    # A second parallel adapter finds the same blocks although the first one now hides their fc_out.
    pk.apply(model, pk.Adapter(placement="parallel", bottleneck_size=2), name="par2")
    assert all(layer.adapter_names == ["par", "par2"] for _, layer in adapter_layers(model))
    model = pk.apply(tinyformer(), pk.Adapter(placement="pfeiffer", layers=[1]))
    assert [n for n, _ in adapter_layers(model)] == ["blocks.1.mlp.fc_out"]


def test_parallel_needs_a_feed_forward_block(tinyformer) -> None:
    from peftkit.methods.roles import ARCHITECTURES

    # linear_fc2 naming the MLP itself makes its parent the whole block, which also holds the attention output.
    pk.register_architecture("tinyformer", roles={"linear_proj": ["attn.wo"], "linear_fc2": ["mlp"]})
    try:
        with pytest.raises(ConfigError, match="not a feed-forward block"):
            pk.apply(TinyFormer(), pk.Adapter(placement="parallel"))
    finally:
        ARCHITECTURES.pop("tinyformer", None)


def test_bert_parallel_adapter_joins_the_residual_input() -> None:
    model = build("bert")
    pk.apply(model, pk.Adapter(placement="parallel", bottleneck_size=4, scaling=2.0))
    randomize_adapters(model)
    layer = model.bert.encoder.layer[0].output
    assert isinstance(layer, BottleneckLayer) and layer.input_arg == 1
    out = layer.base_layer
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    expected = out.LayerNorm(out.dense(h) + x + 2.0 * up(torch.relu(down(x))))
    with torch.no_grad():
        assert torch.allclose(layer(h, x), expected, atol=1e-5)


def test_plain_module_error_says_how_to_register() -> None:
    with pytest.raises(ConfigError, match=r"config.*model_type.*or target the modules by name"):
        pk.apply(nn.Sequential(nn.Linear(4, 4)), pk.Adapter())
