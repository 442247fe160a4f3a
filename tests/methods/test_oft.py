"""OFT: HF PEFT parity (tensors, forward, gradients, files both ways) on a tiny Llama and a convolution stack, the
rotation formulas, merging, several adapters, biases and errors."""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.oft import OFTLayer, OFTRotation, cayley, nearest_divisor

from models import (
    assert_loads_in_hf,
    assert_same_grads_as_hf,
    build,
    conv_input,
    conv_stack,
    randomize_adapters,
    randomize_trainable,
    run,
)

peft = pytest.importorskip("peft")

#: model → (builder, forward)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "llama": (lambda: build("llama"), lambda m: run(m, "llama")),
    "conv": (conv_stack, lambda m: m(conv_input())),
}
LLAMA = ["q_proj", "v_proj", "down_proj", "embed_tokens"]  # 32, 32, 64 inputs; 32-dimensional embeddings
#: case → (model, OFT fields, the same for HF PEFT's OFTConfig)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "block-size": ("llama", {"target_modules": LLAMA, "oft_block_size": 8}),
    "r": ("llama", {"target_modules": LLAMA, "r": 4, "oft_block_size": 0}),
    "exact-cayley": ("llama", {"target_modules": LLAMA, "oft_block_size": 8, "use_cayley_neumann": False}),
    "neumann-3": ("llama", {"target_modules": LLAMA, "oft_block_size": 16, "num_cayley_neumann_terms": 3}),
    "coft": ("llama", {"target_modules": LLAMA, "oft_block_size": 8, "coft": True, "eps": 0.02}),
    "block-share": ("llama", {"target_modules": LLAMA, "r": 2, "oft_block_size": 0, "block_share": True}),
    # The 3×3 convolution is left out: HF PEFT's unmerged forward differs from its merge there (tested below).
    "conv-1x1-bias": ("conv", {"target_modules": ["point", "head"], "oft_block_size": 2, "bias": "oft_only"}),
    "conv-exact-share": ("conv", {"target_modules": ["point", "head"], "oft_block_size": 4,
                                  "use_cayley_neumann": False, "block_share": True, "bias": "all"}),
}


def hf_config(**fields: Any) -> Any:
    return peft.OFTConfig(**{k: v for k, v in fields.items() if k != "adjust_block_size"})


def hf_adapter_tensors(hf: Any) -> dict[str, torch.Tensor]:
    """HF PEFT's saved tensors without the base embedding it stores beside an adapter on embed_tokens."""
    return {k: v for k, v in peft.get_peft_model_state_dict(hf).items() if not k.endswith("base_layer.weight")}


def hf_layers(hf: Any) -> dict[str, Any]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in hf.named_modules() if isinstance(m, peft.tuners.oft.OFTLayer)}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_peft_tensors_forward_gradients_and_files(case: str, tmp_path) -> None:
    model, fields = CASES[case]
    builder, forward = MODELS[model]
    ours = pk.apply(builder(), pk.OFT(**fields))
    hf = peft.get_peft_model(builder(), hf_config(**fields)).eval()
    # HF PEFT's names, shapes and zero start (R = I: the output is the base's).
    theirs, mine = hf_adapter_tensors(hf), adapter_state_dict(ours, "default")
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key].detach(), value), key
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        torch.testing.assert_close(forward(ours), base, rtol=0, atol=1e-6)

    # HF PEFT's file → peftkit: the same outputs and gradients.
    randomize_trainable(hf, 0.1, seed=0)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(builder(), tmp_path / "hf", trainable=True)
    with torch.no_grad():
        expected = forward(hf)
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(forward(loaded), expected, rtol=1e-5, atol=1e-6)
    assert_same_grads_as_hf(loaded, hf, forward)

    # peftkit's file → HF PEFT: the same blocks in every layer, the same outputs, only fields HF PEFT has.
    back, written = assert_loads_in_hf(ours, builder, forward, tmp_path / "pk")
    mine_layers = dict(adapter_layers(ours))
    assert set(hf_layers(back)) == set(mine_layers)
    for name, layer in hf_layers(back).items():
        rotation = mine_layers[name].rotations["default"]
        assert (layer.r["default"], layer.oft_block_size["default"]) == (rotation.blocks, rotation.block_size)
    assert set(written) <= set(peft.OFTConfig().to_dict())
    assert {k: written[k] for k in fields if k != "target_modules"} == \
        {k: v for k, v in fields.items() if k != "target_modules"}


def test_hf_peft_unmerged_3x3_convolution_is_not_its_merge(tmp_path) -> None:
    """HF PEFT 0.21.2 rotates a Conv2d's unfolded input patches and folds them back *summed*, so with a kernel larger
    than 1 even R = I changes the output, and its unmerged output is not its merged one. peftkit rotates the filter,
    as HF PEFT's merge does: files agree with HF PEFT's merged model both ways."""
    fields = {"target_modules": ["point", "conv", "head"], "oft_block_size": 2}
    hf = peft.get_peft_model(conv_stack(), hf_config(**fields)).eval()
    with torch.no_grad():
        assert not torch.allclose(hf(conv_input()), conv_stack()(conv_input()), atol=1e-2)  # at R = I
    randomize_trainable(hf, 0.1, seed=0)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(conv_stack(), tmp_path / "hf")
    with torch.no_grad():
        hf_merged = copy.deepcopy(hf).merge_and_unload()
        torch.testing.assert_close(loaded(conv_input()), hf_merged(conv_input()), rtol=1e-5, atol=1e-6)
    randomize_adapters(loaded, seed=4)
    pk.save_adapter(loaded, tmp_path / "pk")
    back = peft.PeftModel.from_pretrained(conv_stack(), str(tmp_path / "pk")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(back(conv_input()), loaded(conv_input()), rtol=1e-5, atol=1e-6)


def test_rotation_formulas() -> None:
    torch.manual_seed(0)
    skew = torch.randn(3, 4, 4, dtype=torch.float64) * 0.1
    skew = skew - skew.transpose(-2, -1)
    eye = torch.eye(4, dtype=torch.float64)
    exact = cayley(skew, neumann=False, terms=5)
    torch.testing.assert_close(exact, (eye - skew) @ torch.linalg.inv(eye + skew))
    torch.testing.assert_close(exact.transpose(-2, -1) @ exact, eye.expand(3, 4, 4))  # orthogonal
    q2, q3, q4 = skew @ skew, skew @ skew @ skew, skew @ skew @ skew @ skew
    torch.testing.assert_close(cayley(skew, neumann=True, terms=5), eye + 2 * skew + 2 * q2 + 2 * q3 + q4)
    for terms in (3, 4):  # HF PEFT's series has the same 4 terms for both
        torch.testing.assert_close(cayley(skew, neumann=True, terms=terms), eye + 2 * skew + 2 * q2 + q3)
    torch.testing.assert_close(cayley(skew, neumann=True, terms=2), eye + 2 * skew)

    # Packed upper triangles, row by row; a block-diagonal rotation of a linear layer's input.
    rotation = OFTRotation(2, 3, share=False, coft=False, eps=1.0, neumann=False, terms=5)
    with torch.no_grad():
        rotation.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]]) * 0.1)
    q = rotation.skew(rotation.weight)
    assert torch.equal(q[0], torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]) * 0.1)
    blocks = rotation.rotations().detach()
    x = torch.randn(5, 6)
    torch.testing.assert_close(rotation.rotate(x), x @ torch.block_diag(*blocks))


def test_coft_projects_each_block_into_its_radius_in_place() -> None:
    model = pk.apply(nn.Sequential(nn.Linear(8, 3)), pk.OFT(target_modules=["0"], oft_block_size=4, coft=True,
                                                             eps=0.1, init_weights=False))
    rotation = model[0].rotations["default"]
    with torch.no_grad():
        rotation.weight.copy_(torch.tensor([[0.3] * 6, [0.001] * 6]))
        model(torch.randn(2, 8))
    norms = rotation.skew(rotation.weight).flatten(1).norm(dim=1)
    radius = 0.1 / 2 ** 0.5  # eps / √(blocks)
    torch.testing.assert_close(norms[0], torch.tensor(radius))  # scaled back onto the radius
    torch.testing.assert_close(rotation.weight[1], torch.full((6,), 0.001))  # inside: kept


def _two_adapters(builder: Callable[[], nn.Module], targets: list[str], **fields: Any) -> nn.Module:
    model = builder()
    pk.apply(model, pk.OFT(target_modules=targets, oft_block_size=4, init_weights=False, **fields), name="a")
    pk.apply(model, pk.OFT(target_modules=targets, r=2, oft_block_size=0, use_cayley_neumann=False,
                           init_weights=False), name="b")
    pk.set_adapter(model, ["a", "b"])
    return model


@pytest.mark.parametrize("model", ["llama", "conv"])
def test_merge_unmerge_several_adapters_and_delete(model: str) -> None:
    builder, forward = MODELS[model]
    targets = LLAMA if model == "llama" else ["point", "conv", "head"]
    net = _two_adapters(builder, targets)
    weights = {n: p.clone() for n, p in net.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        both = forward(net)
        pk.set_adapter(net, "b")
        only_b = forward(net)
        pk.set_adapter(net, ["b", "a"])  # rotations do not commute: the order matters
        swapped = forward(net)
        pk.set_adapter(net, ["a", "b"])
        with pk.disable_adapters(net):
            base = forward(net)
        assert not any(torch.allclose(x, y, atol=1e-4) for x, y in [(base, both), (both, only_b), (both, swapped)])

        pk.merge(net, safe=True)  # W₀ (R_a R_b)ᵀ and e R_a R_b compute what the forward did
        torch.testing.assert_close(forward(net), both, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(net):
            torch.testing.assert_close(forward(net), base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forward(net), both, rtol=1e-5, atol=1e-5)
        pk.unmerge(net)
        for name, p in net.named_parameters():
            if name in weights:
                torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)

        pk.merge(net)
        pk.delete_adapter(net, "a")  # merged first, under b: b is taken out and folded in again
        torch.testing.assert_close(forward(net), only_b, rtol=1e-5, atol=1e-5)
        pk.unmerge(net)
        for name, p in net.named_parameters():
            if name in weights:
                torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)
        plain = pk.unload(net, merge=True)
        torch.testing.assert_close(forward(plain), only_b, rtol=1e-5, atol=1e-5)


def test_merging_some_active_adapters_keeps_their_order_or_is_refused() -> None:
    builder, forward = MODELS["llama"]
    net = _two_adapters(builder, ["q_proj", "embed_tokens"])
    with torch.no_grad():
        both = forward(net)
        with pytest.raises(MergeError, match=r"would change the order .* Merge all of them, or only \['b'\]"):
            pk.merge(net, names=["a"])  # the input to q_proj is rotated by R_a first: R_a cannot go into W
        assert not any(layer.merged_adapters for _, layer in adapter_layers(net))
        model_b = _two_adapters(builder, ["q_proj"])
        pk.merge(model_b, names=["b"])  # the last rotation of the input can
        torch.testing.assert_close(forward(model_b), forward(_two_adapters(builder, ["q_proj"])), rtol=1e-5,
                                   atol=1e-5)
        pk.merge(net, names=["a", "b"])
        torch.testing.assert_close(forward(net), both, rtol=1e-5, atol=1e-5)


def test_training_mode_is_deterministic_and_hf_module_dropout_is_inert(tmp_path) -> None:
    """HF PEFT 0.21.2 builds a multiplicative dropout for module_dropout but never calls it: in training mode its
    output is the evaluation output. peftkit refuses the field, reads it from a file and writes it back unchanged."""
    fields = {"target_modules": ["q_proj", "v_proj"], "oft_block_size": 8}
    hf = peft.get_peft_model(build("llama"), peft.OFTConfig(**fields, module_dropout=0.5))
    randomize_trainable(hf, 0.1, seed=0)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build("llama"), tmp_path / "hf")
    with torch.no_grad():
        expected = run(hf.eval(), "llama")
        assert torch.equal(run(hf.train(), "llama"), expected)
        state = torch.random.get_rng_state()
        torch.testing.assert_close(run(loaded.train(), "llama"), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    pk.save_adapter(loaded, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["module_dropout"] == 0.5
    with pytest.raises(ConfigError, match="module_dropout=0.1: HF PEFT 0.21.2 builds OFT's multiplicative dropout"):
        pk.OFT(module_dropout=0.1)


def test_hf_peft_adjusts_block_sizes_peftkit_refuses_unless_asked(tmp_path, caplog) -> None:
    assert [nearest_divisor(36, v) for v in (5, 7, 8, 10, 36, 50)] == [4, 6, 9, 9, 36, 36]
    with pytest.raises(ConfigError, match=r"oft_block_size=14 does not divide the 32 features "
                                          r"model.layers.0.self_attn.q_proj rotates .* HF PEFT would use "
                                          r"oft_block_size=16"):
        pk.apply(build("llama"), pk.OFT(target_modules=["q_proj"], oft_block_size=14))
    with pytest.raises(ConfigError, match="r=3 does not divide"):
        pk.apply(build("llama"), pk.OFT(target_modules=["q_proj"], r=3, oft_block_size=0))
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        model = pk.apply(build("llama"), pk.OFT(target_modules=["q_proj", "down_proj"], oft_block_size=14,
                                                adjust_block_size=True))
    assert "using oft_block_size=16" in caplog.text
    # HF PEFT's file (config: 14) loads with the block sizes HF PEFT used.
    hf = peft.get_peft_model(build("llama"), peft.OFTConfig(target_modules=["q_proj", "down_proj"], oft_block_size=14))
    randomize_trainable(hf, 0.1, seed=0)
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("llama"), tmp_path)
    layers = dict(adapter_layers(loaded))
    assert layers["model.layers.0.mlp.down_proj"].rotations["default"].block_size == 16  # 64 features
    assert dict(adapter_layers(model)).keys() == layers.keys()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "llama"), run(hf.eval(), "llama"), rtol=1e-5, atol=1e-6)


def test_bias_modes_train_and_save_hf_peft_s_biases() -> None:
    for mode, count in (("oft_only", 2), ("all", 3)):
        model = pk.apply(conv_stack(), pk.OFT(target_modules=["point", "head"], oft_block_size=2, bias=mode))
        hf = peft.get_peft_model(conv_stack(), peft.OFTConfig(target_modules=["point", "head"], oft_block_size=2,
                                                              bias=mode))
        biases = sorted(k for k in adapter_state_dict(model, "default") if k.endswith(".bias"))
        assert biases == sorted(k for k in peft.get_peft_model_state_dict(hf) if k.endswith(".bias"))
        assert len(biases) == count
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")) == \
            sorted(n.removeprefix("base_model.model.") for n, p in hf.named_parameters()
                   if p.requires_grad and n.endswith(".bias"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"oft_block_size": 0}, "give exactly one of r .* got r=0, oft_block_size=0"),
    ({"r": 4}, "give exactly one of r .* got r=4, oft_block_size=32"),
    ({"r": -1, "oft_block_size": 0}, "r=-1 must be an integer >= 0"),
    ({"oft_block_size": 2.5}, "oft_block_size=2.5 must be an integer >= 0"),
    ({"eps": 0}, "eps=0 must be a positive number"),
    ({"num_cayley_neumann_terms": 1}, "num_cayley_neumann_terms=1 must be an integer >= 2"),
    ({"coft": 1}, "coft=1 must be True or False"),
    ({"bias": "lora_only"}, "bias='lora_only' must be one of"),
])
def test_bad_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pk.OFT(target_modules=["q_proj"], **fields)


def test_unsupported_layers_are_refused_before_the_model_changes() -> None:
    with pytest.raises(UnsupportedLayerError, match="matches only modules of type Conv1D"):
        pk.apply(build("gpt2"), pk.OFT(target_modules=["c_attn"]))  # GPT-2's Conv1D, as in HF PEFT
    with pytest.raises(UnsupportedLayerError, match="Linear4bit"):
        pk.apply(pk.quantize(build("llama"), compute_dtype=torch.float32), pk.OFT(target_modules=["q_proj"]))
    for conv, text in ((nn.Conv2d(4, 4, 3, groups=2), "groups=2"), (nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
                       (nn.Conv2d(4, 4, (1, 3)), "kernel_size=(1, 3)")):
        model = nn.Sequential(nn.Linear(4, 4), conv)
        with pytest.raises(UnsupportedLayerError, match=re.escape(f"OFT cannot adapt 1 ({text}")):
            pk.apply(model, pk.OFT(target_modules=["0", "1"], oft_block_size=2))
        assert isinstance(model[0], nn.Linear) and not pk.list_adapters(model)
    with pytest.raises(UnsupportedLayerError, match="matches only modules of type Conv1d"):
        pk.apply(nn.Sequential(nn.Conv1d(4, 4, 3)), pk.OFT(target_modules=["0"], oft_block_size=2))


def test_hf_files_peftkit_cannot_read_are_refused(tmp_path) -> None:
    model = pk.apply(build("llama"), pk.OFT(target_modules=["q_proj"], oft_block_size=8))
    pk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "use_new_thing": True}))
    with pytest.raises(ConfigError, match="use_new_thing=True, an option of HF PEFT's OFT that peftkit does not"):
        pk.load_adapter(build("llama"), tmp_path)
    path.write_text(json.dumps({k: v for k, v in written.items() if k != "oft_block_size"}))
    with pytest.raises(ConfigError, match="no oft_block_size: an OFT adapter from HF PEFT before 0.14"):
        pk.load_adapter(build("llama"), tmp_path)


def test_cayley_neumann_files_from_before_hf_peft_0_18_load_with_a_warning(tmp_path, caplog) -> None:
    model = pk.apply(build("llama"), pk.OFT(target_modules=["q_proj"], oft_block_size=8))
    pk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    written = json.loads(path.read_text())
    assert written["peft_version"] == "0.21.2"  # the series peftkit computes: HF PEFT does not warn
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        pk.load_adapter(build("llama"), tmp_path)
        assert "Cayley-Neumann" not in caplog.text
        path.write_text(json.dumps({**written, "peft_version": "0.17.1"}))
        pk.load_adapter(build("llama"), tmp_path)
    assert "HF PEFT 0.17.1, before 0.18 changed the Cayley-Neumann series" in caplog.text


def test_merging_into_a_weight_tied_to_the_head_is_refused() -> None:
    model = build("gemma")  # lm_head shares the input embeddings' weight
    pk.apply(model, pk.OFT(target_modules=["embed_tokens"], oft_block_size=8, init_weights=False))
    layer = model.get_input_embeddings()
    assert isinstance(layer, OFTLayer)
    weight = layer.base_layer.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        pk.merge(model)
    assert torch.equal(layer.base_layer.weight, weight)


def test_default_targets_and_the_command_line_method_name() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.tasks import peft_config

    model = pk.apply(build("llama"), pk.OFT())
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    base = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}
    config = peft_config(config_from_dict({**base, "peft": {"method": "oft", "oft_block_size": 16, "coft": True}}))
    assert type(config) is pk.OFT and (config.oft_block_size, config.coft) == (16, True)


def test_half_precision_base_keeps_fp32_blocks_like_hf_peft_and_merges_once() -> None:
    fields = {"target_modules": ["q_proj", "down_proj", "embed_tokens"], "oft_block_size": 8, "init_weights": False}
    model = pk.apply(build("llama").to(torch.bfloat16), pk.OFT(**fields))
    hf = peft.get_peft_model(build("llama").to(torch.bfloat16), peft.OFTConfig(**fields)).eval()
    mine = adapter_state_dict(model, "default")
    assert {tensor.dtype for tensor in mine.values()} == {torch.float32}
    with torch.no_grad():
        for key, value in hf_adapter_tensors(hf).items():
            mine[key].copy_(value)
        unmerged = run(model, "llama")
        assert unmerged.dtype == torch.bfloat16
        assert torch.equal(unmerged, run(hf, "llama"))  # rotated in fp32, rounded where HF PEFT rounds
        pk.merge(model)
        torch.testing.assert_close(run(model, "llama"), unmerged, rtol=0.05, atol=0.05)
