"""VeRA: the shared projections, forward, merge and files against HF PEFT's VeRA on tiny Llama and GPT-2."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, UnknownFieldError, UnsupportedLayerError
from peftkit.methods.vera import VeRALayer, projections

from models import build, run, train_losses

peft = pytest.importorskip("peft")

#: arch → (targets, the largest (in, out) among them): Llama's down_proj reads 64 features, GPT-2's c_attn writes 96.
CASES = {"llama": (["q_proj", "down_proj"], (64, 32)), "gpt2": (["c_attn", "mlp.c_proj"], (128, 96))}
RANK = 16


def hf_vera(arch: str, **options: Any) -> Any:
    """An HF PEFT VeRA model on ``arch`` with random λ_b, λ_d (``init_weights=False`` draws them)."""
    config = peft.VeraConfig(target_modules=CASES[arch][0], r=RANK, init_weights=False, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out on GPT-2, save_projection=False
        return peft.get_peft_model(build(arch), config).eval()


def ours(arch: str, **options: Any) -> nn.Module:
    return pk.apply(build(arch), pk.VeRA(target_modules=CASES[arch][0], rank=RANK, **options))


def copy_lambdas(hf: Any, model: nn.Module, name: str = "default") -> None:
    """HF PEFT's λ vectors of adapter ``name`` into ``model`` (the inner model's keys are the same in both)."""
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            if ".vera_lambda_" in key and key.endswith(f".{name}"):
                own[key.removeprefix("base_model.model.")].copy_(value)


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return run(model, arch)


@pytest.mark.parametrize("key", [0, 1234])
def test_projections_are_hf_peft_s_for_the_same_key(key: int) -> None:
    hf = hf_vera("llama", projection_prng_key=key)
    (in_max, out_max) = CASES["llama"][1]
    vera_a, vera_b = projections(RANK, in_max, out_max, key)
    assert torch.equal(vera_a, hf.base_model.vera_A["default"])
    assert torch.equal(vera_b, hf.base_model.vera_B["default"])
    model = ours("llama", projection_prng_key=key)
    layers = [m for m in model.modules() if isinstance(m, VeRALayer)]
    assert len(layers) == 4 and all(m.vera_A is layers[0].vera_A for m in layers)  # one shared pair
    assert torch.equal(layers[0].vera_A["default"], vera_a) and torch.equal(layers[0].vera_B["default"], vera_b)


@pytest.mark.parametrize("save_projection", [True, False])
def test_half_precision_bases_round_the_projections_as_hf_peft_does(save_projection: bool, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build("llama").to(torch.bfloat16), peft.VeraConfig(
            target_modules=CASES["llama"][0], r=RANK, save_projection=save_projection))
    model = pk.apply(build("llama").to(torch.bfloat16), pk.VeRA(target_modules=CASES["llama"][0], rank=RANK))
    theirs = hf.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    for attr in ("vera_A", "vera_B"):
        assert torch.equal(getattr(layer, attr)["default"], getattr(theirs, attr)["default"])
        assert not torch.equal(getattr(layer, attr)["default"], projections(RANK, 64, 32, 0)[attr == "vera_B"])
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("llama").to(torch.bfloat16), tmp_path)
    again = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(again.vera_A["default"], layer.vera_A["default"])


@pytest.mark.parametrize("arch", list(CASES))
def test_forward_and_parameters_match_hf_peft(arch: str) -> None:
    hf = hf_vera(arch)
    model = ours(arch)
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())
    # The model's state dict has the keys of the model inside HF PEFT's wrapper (projections included).
    inner = {k.removeprefix("base_model.model.") for k in hf.state_dict() if k.startswith("base_model.model.")}
    assert set(model.state_dict()) == inner
    base = logits(model, arch)
    assert torch.equal(base, logits(build(arch), arch))  # λ_b = 0: the base model's output
    copy_lambdas(hf, model)
    expected = logits(hf, arch)
    assert not torch.allclose(expected, base, atol=1e-4)
    assert torch.allclose(logits(model, arch), expected, atol=1e-6)


def test_layer_formula_on_slices_of_the_shared_matrices() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    model = nn.Sequential(base, nn.ReLU(), nn.Linear(3, 7))
    pk.apply(model, pk.VeRA(target_modules=["0", "2"], rank=4, init_weights=False))
    layer = model[0]
    assert isinstance(layer, VeRALayer)
    vera_a, vera_b = projections(4, 5, 7, 0)  # in_max 5, out_max 7 over both targets
    x = torch.randn(2, 5)
    lb, ld = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    expected = base(x) + ((x @ vera_a[:, :5].T) * ld) @ vera_b[:3].T * lb
    assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("arch", list(CASES))
def test_merge_unmerge_and_disable(arch: str) -> None:
    model = ours(arch)
    copy_lambdas(hf_vera(arch), model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    expected, base = logits(model, arch), logits(build(arch), arch)
    with torch.no_grad():
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        pk.merge(model, safe=True)
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        assert torch.allclose(run(model, arch), expected, atol=1e-5)
        with pk.disable_adapters(model):
            assert torch.allclose(run(model, arch), base, atol=1e-5)
        pk.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                assert torch.allclose(p, weights[n], atol=1e-6), n
        assert torch.allclose(run(model, arch), expected, atol=1e-6)
        plain = pk.unload(model, merge=True)
        assert not any(isinstance(m, VeRALayer) for m in plain.modules())
        assert torch.allclose(run(plain, arch), expected, atol=1e-5)


def _tensor_shapes(directory: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


#: The config fields HF PEFT's VeraConfig reads and computes with (targets: compared as the modules HF PEFT adapts).
FIELDS = ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
          "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "peft_type")


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_cross_load_with_hf_peft_both_ways(arch: str, save_projection: bool, tmp_path) -> None:
    hf = hf_vera(arch, save_projection=save_projection)
    expected = logits(hf, arch)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")  # without projections: drawn again from the key
    assert torch.allclose(logits(loaded, arch), expected, atol=1e-6)

    model = ours(arch, save_projection=save_projection, init_weights=False)
    copy_lambdas(hf, model)
    pk.save_adapter(model, tmp_path / "pk")
    assert _tensor_shapes(tmp_path / "pk") == _tensor_shapes(tmp_path / "hf")
    assert ("base_model.vera_A" in _tensor_shapes(tmp_path / "pk")) == save_projection
    ours_json = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hf_json = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert {f: ours_json[f] for f in FIELDS} == {f: hf_json[f] for f in FIELDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    assert torch.allclose(logits(back, arch), expected, atol=1e-6)
    assert sorted(back.base_model.targeted_module_names) == sorted(hf.base_model.targeted_module_names)
    again = pk.load_adapter(build(arch), tmp_path / "pk")
    assert torch.equal(logits(again, arch), logits(model, arch))


def test_saved_projections_are_loaded_not_redrawn(tmp_path) -> None:
    model = ours("llama")
    copy_lambdas(hf_vera("llama"), model)
    with torch.no_grad():  # matrices from elsewhere (another platform's generator): the file's are used
        for m in model.modules():
            if isinstance(m, VeRALayer):
                m.vera_A["default"].mul_(1.5)
                break
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(build("llama"), tmp_path)
    assert torch.equal(logits(loaded, "llama"), logits(model, "llama"))


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_trained_biases_match_hf_peft_and_cross_load(bias: str, tmp_path) -> None:
    hf = hf_vera("gpt2", bias=bias)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                p.add_(0.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    model = ours("gpt2", bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    hf_trainable = {n.removeprefix("base_model.model.") for n, p in hf.named_parameters() if p.requires_grad}
    assert trainable == hf_trainable and any(n.endswith("c_attn.base_layer.bias") for n in trainable)
    assert any(n.endswith("ln_f.bias") for n in trainable) == (bias == "all")
    loaded = pk.load_adapter(build("gpt2"), tmp_path / "hf")
    assert torch.allclose(logits(loaded, "gpt2"), logits(hf, "gpt2"), atol=1e-6)
    pk.save_adapter(loaded, tmp_path / "pk")
    assert _tensor_shapes(tmp_path / "pk") == _tensor_shapes(tmp_path / "hf")


def test_two_adapters_share_the_projections_and_sum_as_in_hf_peft() -> None:
    hf = hf_vera("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.add_adapter("other", peft.VeraConfig(target_modules=["q_proj"], r=RANK, init_weights=False))
    hf.base_model.set_adapter(["default", "other"])
    model = ours("llama")
    pk.apply(model, pk.VeRA(target_modules=["q_proj"], rank=RANK), name="other")
    copy_lambdas(hf, model)
    copy_lambdas(hf, model, "other")
    pk.set_adapter(model, ["default", "other"])
    assert torch.allclose(logits(model, "llama"), logits(hf, "llama"), atol=1e-6)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.vera_A["other"] is layer.vera_A["default"]
    pk.delete_adapter(model, "default")
    pk.set_adapter(model, "other")
    hf.base_model.set_adapter("other")
    assert torch.allclose(logits(model, "llama"), logits(hf, "llama"), atol=1e-6)
    pk.delete_adapter(model, "other")
    assert not any(isinstance(m, VeRALayer) for m in model.modules())
    pk.apply(model, pk.VeRA(target_modules=["v_proj"], rank=4, projection_prng_key=3))  # none left: new matrices


@pytest.mark.parametrize(("options", "message"), [
    ({"projection_prng_key": 1}, "projection_prng_key=1 differs"),
    ({"rank": 8}, "rank=8 differs"),
    ({"save_projection": False}, "save_projection=False differs"),
])
def test_a_second_adapter_must_agree_on_the_shared_matrices(options: dict[str, Any], message: str) -> None:
    model = ours("llama")
    before = model.state_dict()
    with pytest.raises(ConfigError, match=message):
        pk.apply(model, pk.VeRA(target_modules=["q_proj"], **{"rank": RANK, **options}), name="other")
    assert pk.list_adapters(model) == ["default"] and set(model.state_dict()) == set(before)


def test_a_second_adapter_must_fit_the_shared_matrices() -> None:
    model = pk.apply(build("llama"), pk.VeRA(target_modules=["q_proj"], rank=RANK))  # in_max = out_max = 32
    with pytest.raises(ConfigError, match="does not fit the shared VeRA matrices"):
        pk.apply(model, pk.VeRA(target_modules=["down_proj"], rank=RANK), name="other")  # reads 64 features
    hf = peft.get_peft_model(build("llama"), peft.VeraConfig(target_modules=["q_proj"], r=RANK))
    with pytest.raises(ValueError, match="vera_A has a size of 32 but 64"):  # HF PEFT refuses it too
        hf.add_adapter("other", peft.VeraConfig(target_modules=["down_proj"], r=RANK))


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"rank": 0}, ConfigError, "rank=0 must be an integer >= 1"),
    ({"rank": -4}, ConfigError, "rank=-4"),
    ({"rank": True}, ConfigError, "rank=True"),
    ({"projection_prng_key": 1.5}, ConfigError, "projection_prng_key=1.5 must be an integer"),
    ({"dropout": 1.0}, ConfigError, r"dropout=1.0 must be in \[0, 1\)"),
    ({"d_initial": float("nan")}, ConfigError, "d_initial=nan"),
    ({"bias": "lora_only"}, ConfigError, "bias='lora_only' must be one of"),
    ({"save_projection": "yes"}, ConfigError, "save_projection='yes'"),
    ({"vera_dropout": 0.1}, UnknownFieldError, "'vera_dropout'"),
])
def test_bad_options_are_refused_by_name(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        pk.VeRA(target_modules=["q_proj"], **options)


def test_unsupported_layers_and_defaults() -> None:
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        pk.apply(build("llama"), pk.VeRA(target_modules=["embed_tokens"]))
    model = pk.apply(build("llama"), pk.VeRA(rank=8))  # HF PEFT's defaults: q_proj, v_proj on Llama
    targets = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, VeRALayer))
    assert targets == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_training_lowers_the_loss() -> None:
    model = build("llama").train()
    pk.apply(model, pk.VeRA(target_modules=["q_proj", "v_proj", "down_proj"], rank=32))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.05)
    assert losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "qwen2"])
def test_omitted_targets_are_hf_peft_s_defaults(arch: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build(arch), peft.VeraConfig(r=8))
    model = pk.apply(build(arch), pk.VeRA(rank=8))
    assert {n for n, m in model.named_modules() if isinstance(m, VeRALayer)} == set(hf.base_model.targeted_module_names)
    layer = next(m for m in model.modules() if isinstance(m, VeRALayer))
    assert torch.equal(layer.vera_A["default"], hf.base_model.vera_A["default"])  # sized alike
    assert torch.equal(layer.vera_B["default"], hf.base_model.vera_B["default"])
