"""LoRA config validation, layer formulas against a direct computation, and adapter bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterExistsError, AdapterNotFoundError, AdapterStateError, ConfigError, MergeError

from models import ConvNet, build


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, r"rank=0 must be a positive integer"),
        ({"rank": -2}, r"rank=-2"),
        ({"rank": 2.5}, r"rank=2.5"),
        ({"rank": True}, r"rank=True"),
        ({"alpha": 0}, r"alpha=0 must be a positive number"),
        ({"alpha": float("nan")}, r"alpha=nan"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1"),
        ({"init_A": "orthogonal"}, r"init_A='orthogonal' must be one of"),
        ({"bias": "some"}, r"bias='some'"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0"),
        ({"layers": [-1]}, r"layers=\[-1\]"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.LoRA(target_modules=["q_proj"], **kwargs)


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        pk.LoRA(target_modules=["q_proj"], rank=0)


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    (pk.LoRA, {"r": 8}, r"'r' is HF PEFT's name: use rank"),
    (pk.LoRA, {"lora_alpha": 16, "rank": 8}, r"'lora_alpha' is HF PEFT's name: use alpha"),
    (pk.LoRA, {"use_dora": True}, r"use pk\.DoRA"),
    (pk.DoRA, {"dropuot": 0.1}, r"'dropuot': did you mean 'dropout'\?"),
    (pk.AdaLoRA, {"target_r": 4, "total_step": 10}, r"'target_r' is HF PEFT's name: use target_rank"),
    (pk.IA3, {"rank": 4}, r"'rank' is not a field.*feedforward_modules"),
    (pk.IA3, {"r": 4}, r"'r' is not a field"),  # no hint towards a field this config does not have
    (pk.AdaLoRA, {"r": 4, "total_step": 10}, r"'r' is not a field"),
])
def test_unknown_fields_name_the_field_to_use(config: type, kwargs: dict, match: str) -> None:
    from peftkit.errors import UnknownFieldError

    with pytest.raises(UnknownFieldError, match=match) as info:
        config(target_modules=["q_proj"], **kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)  # as Python's own, and ours


def test_linear_formula() -> None:
    base = nn.Linear(6, 5)
    model = nn.Sequential(base)
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=3, alpha=6, init_B="gaussian"))
    layer = model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (6 / 3) * (x @ A.T @ B.T)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_rslora_scale_and_patterns() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    pk.apply(model, pk.LoRA(target_modules=["0", "1"], rank=4, alpha=8, use_rslora=True,
                            rank_pattern={"1": 2}, alpha_pattern={"1": 3}))
    assert model[0].scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert model[1].rank["default"] == 2 and model[1].scaling["default"] == pytest.approx(3 / math.sqrt(2))


def test_embedding_and_conv_formulas() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    pk.apply(model, pk.LoRA(target_modules=["embed", "conv2"], rank=2, alpha=4, init_A="gaussian", init_B="gaussian"))
    emb, conv = model.embed, model.conv2
    ids = torch.randint(0, 96, (3, 7))
    A, B = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    assert torch.allclose(emb(ids), emb.base_layer.weight[ids] + 2 * (A.T[ids] @ B.T), atol=1e-6)
    x = torch.randn(2, 1, 7, 8)
    dense = conv.base_layer.weight + conv.delta_weight("default")
    expected = torch.nn.functional.conv2d(x, dense, conv.base_layer.bias, stride=2, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_only_adapter_and_saved_module_parameters_train() -> None:
    model = build("bert")
    pk.apply(model, pk.LoRA(target_modules=["query"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("classifier.copies.default.") for n in trainable)
    assert not model.classifier.base_layer.weight.requires_grad


def test_modules_to_save_copy_trains_and_original_stays() -> None:
    model = build("bert")
    pk.apply(model, pk.LoRA(target_modules=["query"], modules_to_save=["classifier"]))
    original = model.classifier.base_layer.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=torch.randint(0, 96, (2, 5)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    opt.step()
    assert torch.equal(model.classifier.base_layer.weight, original)
    assert not torch.equal(model.classifier.copies["default"].weight, original)


def test_several_adapters_bookkeeping() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"]), name="a")
    pk.apply(model, pk.LoRA(target_modules=["v_proj"]), name="b")
    assert pk.list_adapters(model) == ["a", "b"] and pk.active_adapters(model) == ["a"]
    pk.set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    with pytest.raises(AdapterExistsError, match="'a' already exists"):
        pk.apply(model, pk.LoRA(target_modules=["k_proj"]), name="a")
    with pytest.raises(AdapterNotFoundError, match="'c'"):
        pk.set_adapter(model, "c")
    pk.delete_adapter(model, "a")
    assert pk.list_adapters(model) == ["b"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # layer unwrapped again


def test_applying_to_merged_model_is_refused_and_nothing_changes() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"]))
    pk.merge(model)
    before = list(model.named_modules())
    with pytest.raises(AdapterStateError, match="pk.unmerge"):
        pk.apply(model, pk.LoRA(target_modules=["v_proj"]), name="second")
    assert [n for n, _ in model.named_modules()] == [n for n, _ in before]


def test_safe_merge_refuses_non_finite_delta_and_names_module() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], init_B="gaussian"))
    weights = [layer.self_attn.q_proj.base_layer.weight.clone() for layer in model.model.layers]
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.q_proj .*nothing was merged"):
        pk.merge(model, safe=True)
    for layer, weight in zip(model.model.layers, weights, strict=True):  # layer 0, merged first, too
        assert torch.equal(layer.self_attn.q_proj.base_layer.weight, weight)
        assert not layer.self_attn.q_proj.merged_adapters


def test_plain_lora_on_a_layer_of_another_lora_variant_is_refused() -> None:
    """(A DoRA layer takes plain LoRA adapters too, as in HF PEFT: tests/methods/test_dora.py.)"""
    model = build("llama")
    pk.apply(model, pk.AdaLoRA(target_modules=["q_proj"], total_step=10), name="first")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match="must use the same method"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"]), name="second")
    assert [n for n, _ in model.named_modules()] == before
    pk.apply(model, pk.LoRA(target_modules=["v_proj"]), name="third")  # other layers are fine


def test_fields_every_method_shares_go_by_name() -> None:
    """A positional argument is the method's own first field, never target_modules (which applies to all)."""
    assert pk.LoRA(8).rank == 8
    assert pk.TrainableTokens([1, 2]).token_indices == [1, 2]
    assert pk.BitFit(True).train_norms and pk.BitFit(True).target_modules == ["all"]
    with pytest.raises(TypeError, match="positional"):
        pk.IA3(["down_proj"], ["k_proj", "down_proj"])  # type: ignore[misc]  # targets only by name
