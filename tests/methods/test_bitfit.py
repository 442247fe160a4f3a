"""BitFit: only biases train, formula, several adapters, merge, save/load, errors, trainable share."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.bitfit import BitFitLayer

from models import ARCHS, build, run, train_losses


def perturb(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def test_formula_is_the_layer_with_the_trained_bias() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = BitFitLayer(base)
    layer.add("a", with_weight=False)
    layer.add("b", with_weight=False)
    layer.set_active(["a"])
    with torch.no_grad():
        layer.bitfit_bias["a"].copy_(torch.randn(3))
        layer.bitfit_bias["b"].copy_(torch.randn(3))
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), x @ base.weight.T + layer.bitfit_bias["a"])
    layer.set_active(["a", "b"])  # several adapters: the base bias plus both changes
    delta = (layer.bitfit_bias["a"] - base.bias) + (layer.bitfit_bias["b"] - base.bias)
    assert torch.allclose(layer(x), x @ base.weight.T + base.bias + delta, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "t5"])
def test_only_biases_train_merge_and_round_trip(arch: str, tmp_path) -> None:
    model = build(arch)
    with torch.no_grad():
        base = run(model, arch)
    config = pk.BitFit(train_norms=arch == "t5")  # T5 has no biases: only its RMSNorm gains
    pk.apply(model, config)
    # A sequence classifier also trains its head in full (as HF PEFT and the BitFit paper do).
    head = "classifier." if arch == "bert" else "<none>"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head)]
    assert trainable and all(n.endswith(("bitfit_bias.default", "bitfit_weight.default")) for n in trainable)
    if arch == "bert":
        assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(head)] == [
            "classifier.copies.default.weight", "classifier.copies.default.bias"]
    with torch.no_grad():
        assert torch.equal(run(model, arch), base)
        perturb(model)
        expected = run(model, arch)
        assert not torch.allclose(expected, base, atol=1e-6)
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        pk.merge(model, safe=True)
        assert torch.allclose(run(model, arch), expected, atol=1e-6)
        pk.unmerge(model)
        assert torch.allclose(run(model, arch), expected, atol=1e-6)
    pk.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    assert all(k.startswith("base_model.model.") and k.endswith((".bias", ".weight")) for k in saved)
    if arch != "t5":
        assert all(k.endswith(".bias") for k in saved if not k.startswith("base_model.model.classifier."))
    loaded = pk.load_adapter(build(arch), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(loaded, arch), expected)


def test_two_adapters_side_by_side() -> None:
    model = build("gpt2")
    pk.apply(model, pk.BitFit(), name="a")
    pk.apply(model, pk.BitFit(target_modules=["c_fc"]), name="b")
    perturb(model)
    pk.set_adapter(model, "b")
    perturb(model, seed=1)
    with torch.no_grad():
        pk.set_adapter(model, "a")
        out_a = run(model, "gpt2")
        pk.set_adapter(model, "b")
        out_b = run(model, "gpt2")
        assert not torch.allclose(out_a, out_b, atol=1e-5)
        pk.set_adapter(model, ["a", "b"])
        both = run(model, "gpt2")
        pk.merge(model, ["a", "b"])
        assert torch.allclose(run(model, "gpt2"), both, atol=1e-5)


def test_model_without_biases_is_an_error() -> None:
    with pytest.raises(TargetNotFoundError, match="no bias parameters"):
        pk.apply(build("llama"), pk.BitFit())
    with pytest.raises(UnsupportedLayerError, match="bias"):
        pk.apply(build("llama"), pk.BitFit(target_modules=["q_proj"]))
    with pytest.raises(ConfigError):
        pk.BitFit(train_norms="yes")  # type: ignore[arg-type]


def test_bert_base_shaped_trainable_share_is_about_a_tenth_of_a_percent() -> None:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(BertConfig())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    pk.apply(model, pk.BitFit())
    trainable, total = pk.count_parameters(model)
    assert trainable == biases == 102_912  # every bias of BERT-base: layers, LayerNorms, pooler
    assert 0.0008 < trainable / (total - trainable) < 0.0011


def test_training_lowers_the_loss() -> None:
    model = build("gpt2")
    model.train()
    pk.apply(model, pk.BitFit())
    ids = ARCHS["gpt2"].inputs()["input_ids"]
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.05)
    assert losses[-1] < losses[0] - 0.05
