"""MiSS: the formulas, HF PEFT parity for every variant (initialisation, forward, gradients, dropout masks, several
adapters, files both ways, biases), merging, and what is refused."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import ConfigError, MergeError, UnknownFieldError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.miss import MiSSLayer

from models import (
    assert_loads_in_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    hf_pair,
    randomize_adapters,
    randomize_trainable,
    run,
)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mlp() -> nn.Module:
    """Linear layers with biases and widths no small rank divides (10 → 12 → 6)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6)).eval()


def mlp_input() -> torch.Tensor:
    return torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(3))


#: model → (builder, forward)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "llama": (lambda: build("llama"), lambda m: run(m, "llama")),
    "mlp": (mlp, lambda m: m(mlp_input())),
}
LLAMA = ["q_proj", "v_proj", "down_proj"]
#: case → (model, peftkit config fields; HF PEFT's are the same with ``r`` for ``rank``, ``miss_dropout`` for
#: ``dropout``)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "balance": ("llama", {"target_modules": LLAMA, "rank": 8}),
    "balance-random": ("llama", {"target_modules": LLAMA, "rank": 6, "init_weights": False}),
    "mini": ("llama", {"target_modules": LLAMA, "rank": 4, "init_weights": "mini", "mini_r": 8}),
    "bat": ("llama", {"target_modules": LLAMA, "rank": 4, "init_weights": "bat"}),
    "remainder-bias": ("mlp", {"target_modules": ["0", "2"], "rank": 3, "bias": "MiSS_only"}),
    "bat-bias-all": ("mlp", {"target_modules": ["2"], "rank": 6, "init_weights": "bat", "bias": "all"}),
}
HF_NAMES = {"rank": "r", "dropout": "miss_dropout"}


def hf_config(**fields: Any) -> Any:
    return peft.MissConfig(**{HF_NAMES.get(k, k): v for k, v in fields.items()})


def pair(case: str, seed: int = 1) -> tuple[nn.Module, Any, Callable[[nn.Module], torch.Tensor]]:
    model, fields = CASES[case]
    builder, forward = MODELS[model]
    ours, hf = hf_pair(builder, pk.MiSS(**fields), hf_config(**fields), seed)
    return ours, hf, forward


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_peft_initialisation_forward_gradients_and_files(case: str, tmp_path) -> None:
    model_name, fields = CASES[case]
    ours, hf, forward = pair(case)
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        with pk.disable_adapters(ours):
            base = forward(ours)
        torch.testing.assert_close(forward(ours), forward(hf), rtol=1e-5, atol=1e-6)
        if fields.get("init_weights", True) is not False:  # every variant but the random one starts at zero
            assert torch.equal(forward(ours), base)

    # HF PEFT's file → peftkit: the same outputs.
    randomize_trainable(hf, 0.2, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(MODELS[model_name][0](), tmp_path / "hf")
    with torch.no_grad():
        expected = forward(hf)
        assert not torch.allclose(expected, base, atol=1e-3)
        torch.testing.assert_close(forward(loaded), expected, rtol=1e-5, atol=1e-5)

    # The same gradients, biases included.
    pk.set_adapter(loaded, "default")  # trainable again
    pk.MiSS(**fields).after_apply(loaded, "default")
    assert_same_grads_as_hf(loaded, hf, forward, atol=1e-5)

    # peftkit's file → HF PEFT: the same outputs and settings in every layer.
    back, written = assert_loads_in_hf(ours, MODELS[model_name][0], forward, tmp_path / "pk", atol=1e-5)
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in back.named_modules()
                 if isinstance(m, peft.tuners.miss.MissLayer)}
    assert set(hf_layers) == set(dict(adapter_layers(ours)))
    for layer in hf_layers.values():
        assert (layer.miss_r["default"], layer.miss_fn) == (fields["rank"], fields.get("init_weights", True))
    assert set(written) <= set(peft.MissConfig().to_dict())  # only fields HF PEFT has


def test_formulas() -> None:
    torch.manual_seed(0)
    model = pk.apply(nn.Sequential(nn.Linear(7, 4)), pk.MiSS(target_modules=["0"], rank=3, init_weights=False))
    layer = model[0]
    assert isinstance(layer, MiSSLayer)
    d = layer.miss_block["default"]  # r × out, its transpose tiled along the input and cut: ΔW[o, j] = D[j mod r, o]
    delta = torch.stack([d[j % 3] for j in range(7)], dim=1)
    x = torch.randn(5, 7)
    torch.testing.assert_close(model(x), x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias)
    torch.testing.assert_close(layer.delta_weight("default"), delta)

    model = pk.apply(nn.Sequential(nn.Linear(4, 6)), pk.MiSS(target_modules=["0"], rank=2, init_weights="bat"))
    randomize_adapters(model)
    layer, w = model[0], model[0].base_layer.weight
    b = layer.miss_block["default"]  # one r × r block per block row a: W_ac ← W_ac + W_ac B_a + B_a
    assert b.shape == (3, 2, 2)
    expected = torch.cat([torch.cat([w[2 * a:2 * a + 2, 2 * c:2 * c + 2] @ (torch.eye(2) + b[a]) + b[a]
                                     for c in range(2)], dim=1) for a in range(3)])
    torch.testing.assert_close(model(x[:, :4]), x[:, :4] @ expected.T + layer.base_layer.bias)


@pytest.mark.parametrize("variant", ["balance", "bat"])
def test_several_active_adapters_and_dropout_masks_match_hf_peft(variant: str) -> None:
    """Balance adapters are summed (each pads the input further, which shapes HF PEFT's dropout masks); bat adapters
    update the weight one after the other."""
    builder, forward = MODELS["mlp"]
    # Balance: a pads the 10 inputs to 12, and HF PEFT's b pads those to 15 (alone it would not pad).
    target, ranks = ("0", {"a": 4, "b": 5}) if variant == "balance" else ("2", {"a": 2, "b": 6})
    init: bool | str = False if variant == "balance" else "bat"
    dropout = 0.3 if variant == "balance" else 0.0
    ours, hf = builder(), builder()
    for name, rank in ranks.items():
        fields = {"target_modules": [target], "rank": rank, "init_weights": init, "dropout": dropout}
        pk.apply(ours, pk.MiSS(**fields), name=name)
        if name == "a":
            hf = peft.get_peft_model(hf, hf_config(**fields), adapter_name=name)
        else:
            hf.add_adapter(name, hf_config(**fields))
    randomize_adapters(ours, seed=4)
    hf.base_model.model.load_state_dict(ours.state_dict())
    pk.set_adapter(ours, ["a", "b"])
    hf.base_model.set_adapter(["a", "b"])
    hf.eval()  # its dropout modules start in training mode
    with torch.no_grad():
        both = forward(ours)
        torch.testing.assert_close(both, forward(hf), rtol=1e-5, atol=1e-5)
        ours.train(), hf.train()
        for step in range(3):
            torch.manual_seed(10 + step)
            mine = forward(ours)
            torch.manual_seed(10 + step)
            torch.testing.assert_close(mine, forward(hf), rtol=1e-5, atol=1e-5)
            assert torch.equal(mine, both) == (dropout == 0)
        pk.set_adapter(ours, ["b", "a"])
        assert torch.allclose(forward(ours.eval()), both, atol=1e-5) == (variant == "balance")


@pytest.mark.parametrize("init", [False, "mini", "bat"])
def test_merge_unmerge_several_adapters_and_delete(init: bool | str) -> None:
    builder, forward = MODELS["llama"]
    model = builder()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    for name, rank in (("a", 4), ("b", 8), ("c", 4)):
        fields = {"target_modules": LLAMA if name != "c" else ["q_proj"], "rank": rank, "init_weights": init}
        pk.apply(model, pk.MiSS(**fields, mini_r=4 if init == "mini" else 1), name=name)
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        pk.set_adapter(model, ["a", "b", "c"])
        every = forward(model)
        if init == "bat":  # each update depends on the weight the previous ones left
            with pytest.raises(MergeError, match=r"in the order \['b', 'a', 'c'\] instead of \['a', 'b', 'c'\]"):
                pk.merge(model, "b")
        pk.merge(model, "a")
        torch.testing.assert_close(forward(model), every, rtol=1e-5, atol=1e-5)
        pk.merge(model, safe=True)
        torch.testing.assert_close(forward(model), every, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(model):
            torch.testing.assert_close(forward(model), run(builder(), "llama"), rtol=1e-5, atol=1e-5)

        pk.delete_adapter(model, "a")
        assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["b", "c"]
        pk.unmerge(model)
        for name, p in model.named_parameters():
            original = name.replace(".base_layer", "")
            if original in weights:
                torch.testing.assert_close(p, weights[original], rtol=0, atol=1e-5)
        without_a = forward(model)
        plain = pk.unload(model, merge=True)
        torch.testing.assert_close(run(plain, "llama"), without_a, rtol=1e-5, atol=1e-5)


def test_hf_files_with_options_their_variant_ignores_load_and_unknown_options_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    hf = peft.get_peft_model(mlp(), peft.MissConfig(target_modules=["2"], r=6, init_weights="bat", miss_dropout=0.1,
                                                    mini_r=3)).eval()
    randomize_trainable(hf, 0.2, seed=0, shift=True)
    hf.save_pretrained(str(tmp_path))
    model = pk.load_adapter(mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(mlp_input()), hf(mlp_input()), rtol=1e-5, atol=1e-5)
    config = pk.MiSS.from_hf_dict(json.loads((tmp_path / "adapter_config.json").read_text()), [])
    assert (config.dropout, config.mini_r) == (0.0, 1)

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_new_thing": True}))
    with pytest.raises(ConfigError, match="use_new_thing=True, an option of HF PEFT's MISS that peftkit does not"):
        pk.load_adapter(mlp(), tmp_path)


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"rank": 0}, ConfigError, "rank=0 must be a positive integer"),
    ({"rank": 2.0}, ConfigError, "rank=2.0 must be a positive integer"),
    ({"mini_r": 0, "init_weights": "mini"}, ConfigError, "mini_r=0 must be a positive integer"),
    ({"mini_r": 4}, ConfigError, "mini_r=4 is used only with init_weights='mini'"),
    ({"dropout": 0.1, "init_weights": "bat"}, ConfigError, "dropout=0.1 with init_weights='bat'"),
    ({"dropout": 1.0}, ConfigError, r"dropout=1.0 must be in \[0, 1\)"),
    ({"init_weights": "bone"}, ConfigError, "init_weights='bone' must be one of True, False, 'bat', 'mini'"),
    ({"bias": "miss_only"}, ConfigError, "bias='miss_only' must be one of"),
    ({"r": 8}, UnknownFieldError, "'r' is HF PEFT's name: use rank"),
    ({"miss_dropout": 0.1}, UnknownFieldError, "'miss_dropout': did you mean 'dropout'"),
])
def test_bad_fields_are_refused(fields: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        pk.MiSS(target_modules=["q_proj"], **fields)


@pytest.mark.parametrize(("fields", "message"), [
    ({"rank": 11}, "rank=11 exceeds the 10 input features of 0"),
    ({"rank": 4, "init_weights": "bat"}, r"rank=4 with init_weights='bat' must divide both sides of 0 \(12 × 10\)"),
    ({"rank": 2, "init_weights": "mini", "mini_r": 5}, "mini_r=5 must divide the 12 output features of 0"),
])
def test_shapes_a_variant_cannot_take_are_refused_before_the_model_changes(fields: dict[str, Any],
                                                                           message: str) -> None:
    model = mlp()
    with pytest.raises(ConfigError, match=message):
        pk.apply(model, pk.MiSS(target_modules=["0"], **fields))
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError):
        peft.get_peft_model(mlp(), hf_config(target_modules=["0"], **fields))


#: layer kind → (model builder, target) for layers HF PEFT 0.21.2's MiSS does not adapt
UNSUPPORTED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "Conv1D": (lambda: build("gpt2"), "c_attn"),
    "Embedding": (lambda: build("gpt2"), "wte"),
    "Conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3)), "0"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_layers_hf_peft_does_not_adapt_are_refused(kind: str) -> None:
    builder, target = UNSUPPORTED[kind]
    with pytest.raises(UnsupportedLayerError, match=f"only modules of type {kind}, .*: Linear"):
        pk.apply(builder(), pk.MiSS(target_modules=[target], rank=2))
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(builder(), hf_config(target_modules=[target], rank=2))


def test_variants_and_default_targets_and_the_command_line_name() -> None:
    from peftkit.train.config import config_from_dict
    from peftkit.train.tasks import peft_config

    model = pk.apply(build("llama"), pk.MiSS(rank=4))  # LoRA's default targets, as in HF PEFT
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)) == ["q_proj"] * 2 + ["v_proj"] * 2
    with pytest.raises(ConfigError, match="holds MiSS adapters of another variant"):
        pk.apply(model, pk.MiSS(target_modules=["q_proj"], rank=4, init_weights="bat"), name="bat")
    assert pk.list_adapters(model) == ["default"]
    base = {"checkpoint": {"pretrained": {"config": {"model_type": "llama"}}}}
    config = peft_config(config_from_dict({**base, "peft": {"method": "miss", "rank": 4}}))
    assert type(config) is pk.MiSS and config.rank == 4


def test_merging_into_a_weight_tied_to_the_embeddings_is_refused() -> None:
    model = build("gemma")  # lm_head shares the input embeddings' weight
    pk.apply(model, pk.MiSS(target_modules=["lm_head"], rank=4, init_weights=False))
    weight = model.lm_head.base_layer.weight.clone()
    with pytest.raises(MergeError, match="tied"):
        pk.merge(model)
    assert torch.equal(model.lm_head.base_layer.weight, weight)


def test_a_bat_update_that_cannot_be_undone_is_refused_when_unmerging() -> None:
    model = pk.apply(mlp(), pk.MiSS(target_modules=["2"], rank=6, init_weights="bat"))
    with torch.no_grad():
        model[2].miss_block["default"].copy_(-torch.eye(6).expand(1, 6, 6))  # I + B = 0
    pk.merge(model)
    with pytest.raises(MergeError, match="I \\+ B is singular"):
        pk.unmerge(model)
    assert model[2].merged_adapters == ["default"]


@pytest.mark.parametrize("init", [False, "bat"])
def test_quantized_layers_compute_with_their_dequantized_weight_and_merge_by_requantizing(init: bool | str) -> None:
    """As in HF PEFT, MiSS adapts quantized linear layers: balance adds its update to the quantized layer's output, bat
    updates the dequantized weight; merging re-quantizes (not exact: the error is kept)."""
    fields: dict[str, Any] = {"target_modules": ["q_proj", "down_proj"], "rank": 8, "init_weights": init}
    quantized = pk.quantize(build("llama"), compute_dtype=torch.float32)
    plain = pk.unload(copy.deepcopy(quantized), merge=False, dequantize=True)  # the same weights, in float
    for model in (quantized, plain):
        pk.apply(model, pk.MiSS(**fields))
        randomize_adapters(model, seed=1)
        with torch.no_grad():  # an update of the weights' size (0.02), which NF4 blocks then resolve
            for p in model.parameters():
                p.mul_(0.2 if p.requires_grad else 1.0)
    with torch.no_grad():
        expected = run(plain, "llama")
        torch.testing.assert_close(run(quantized, "llama"), expected, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(quantized):
            base = run(quantized, "llama")
        pk.merge(quantized, safe=True)
        layer = quantized.model.layers[0].self_attn.q_proj
        assert layer.merge_errors["default"] > 0
        merged = run(quantized, "llama")
        assert (merged - expected).abs().max() < 0.2 * (expected - base).abs().max()  # ΔW is in, up to rounding
        pk.unmerge(quantized)
        assert not layer.merge_errors
        with pk.disable_adapters(quantized):  # the weight is re-quantized once more: near its old codes
            assert (run(quantized, "llama") - base).abs().max() < 0.2 * (expected - base).abs().max()


@pytest.mark.parametrize("init", [False, "bat"])
def test_a_bfloat16_model_keeps_fp32_blocks_rounded_as_hf_peft_rounds_them(init: bool | str) -> None:
    fields: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "rank": 4, "init_weights": init}
    torch.manual_seed(1)
    ours = pk.apply(build("llama").to(torch.bfloat16), pk.MiSS(**fields))
    torch.manual_seed(1)
    hf = peft.get_peft_model(build("llama").to(torch.bfloat16), hf_config(**fields)).eval()
    mine, theirs = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(hf)
    assert all(mine[k].dtype == torch.float32 and torch.equal(mine[k], v) for k, v in theirs.items())
    randomize_trainable(hf, 0.2, seed=0, shift=True)  # the bat blocks start at zero
    ours.load_state_dict(hf.base_model.model.state_dict())  # the same keys
    with torch.no_grad():
        out = run(ours, "llama")
        assert out.dtype == torch.bfloat16 and torch.equal(out, run(hf, "llama"))
        assert not torch.equal(out, run(build("llama").to(torch.bfloat16), "llama"))
