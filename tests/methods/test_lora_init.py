"""LoRA initialised from the base weight (``pk.LoRA(init=...)``): PiSSA, OLoRA and orthogonal.

Factors and residual weights against HF PEFT's for the same base weights and seed, the output unchanged at
initialisation, half-precision bases, the conversion to a plain LoRA adapter for the original model (against HF
PEFT's ``path_initial_model_for_weight_conversion``, and loaded in both libraries), saving and reloading as HF PEFT
does, merging, deleting, and the refusals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import ConfigError, ShapeMismatchError, UnknownFieldError
from peftkit.io.hf_format import module_names
from peftkit.methods.lora import hf_pattern

from models import ConvNet, assert_factors_match, assert_hf_conversion_matches, build, lora_layers, train_losses

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
#: Llama: nn.Linear (k/v narrower than q); GPT-2: Conv1D, whose weight is stored transposed.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
CASES = [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"), ("llama", "orthogonal"),
         ("gpt2", "pissa"), ("gpt2", "pissa_niter_3"), ("gpt2", "orthogonal")]


def ours(arch: str, init: str, seed: int = 7, **kwargs: object) -> nn.Module:
    model = build(arch)
    torch.manual_seed(seed)
    return pk.apply(model, pk.LoRA(target_modules=TARGETS[arch], rank=4, alpha=8, init=init, **kwargs))  # type: ignore[arg-type]


def theirs(arch: str, init: str, seed: int = 7, **kwargs: object) -> nn.Module:
    model = build(arch)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=init, **kwargs)
    return peft.get_peft_model(model, config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def train(model: nn.Module, steps: int = 4) -> nn.Module:
    model.train()
    train_losses(model, lambda: model(input_ids=IDS, labels=IDS).loss, lr=1e-2, steps=steps)
    return model.eval()


# ------------------------------------------------------------------------------------ HF PEFT parity at init


@pytest.mark.parametrize("arch,init", CASES)
def test_factors_and_residual_equal_hf_peft_and_output_is_unchanged(arch: str, init: str) -> None:
    model, hf, base = ours(arch, init), theirs(arch, init), build(arch)
    original = dict(base.named_modules())
    for qualname, layer in lora_layers(model):
        other = hf.base_model.model.get_submodule(qualname)
        A, B = assert_factors_match(layer, other)
        assert A.abs().sum() > 0 and B.abs().sum() > 0
        residual, weight = layer.base_layer.weight, original[qualname].weight
        torch.testing.assert_close(residual, other.base_layer.weight, rtol=1e-5, atol=1e-6)
        if init == "orthogonal":  # B A = 0: the base weight is left alone
            assert torch.equal(residual, weight)
            torch.testing.assert_close(B @ A, torch.zeros_like(B @ A), rtol=0, atol=1e-6)
        else:  # W = W_res + s·BA with a non-zero s·BA
            delta = layer.delta_weight("default")
            assert delta.abs().max() > 1e-2
            kind = layer.kind
            torch.testing.assert_close(kind.weight(layer.base_layer) + delta, kind.weight(original[qualname]),
                                       rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_starts_from_the_residual_as_in_hf_peft(init: str) -> None:
    """The magnitude is the norm of ``W_res + s·BA``, i.e. of the original W: the output is unchanged."""
    torch.manual_seed(7)
    model = pk.apply(build("llama"), pk.DoRA(target_modules=TARGETS["llama"], rank=4, alpha=8, init=init))
    hf = theirs("llama", init, use_dora=True)
    original = dict(build("llama").named_modules())
    for qualname, layer in lora_layers(model):
        other = hf.base_model.model.get_submodule(qualname)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_A["default"].weight, other.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        magnitude = layer.lora_magnitude_vector["default"]
        torch.testing.assert_close(magnitude, other.lora_magnitude_vector["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(magnitude, original[qualname].weight.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model), logits(build("llama")), rtol=0, atol=1e-5)


def test_pissa_is_the_best_rank_r_approximation_and_olora_b_is_orthonormal() -> None:
    base = nn.Sequential(nn.Linear(10, 8, dtype=torch.float64))  # computed in fp64: exact to fp64 rounding
    W = base[0].weight.detach().clone()
    model = pk.apply(base, pk.LoRA(target_modules=["0"], rank=3, alpha=6, init="pissa"))
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(model[0].delta_weight("default"), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    olora = pk.apply(nn.Sequential(nn.Linear(10, 8)), pk.LoRA(target_modules=["0"], rank=3, init="olora"))
    B = olora[0].lora_B["default"].weight
    torch.testing.assert_close(B.T @ B, torch.eye(3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_half_precision_base_computes_in_fp32_as_hf_peft(dtype: torch.dtype, init: str) -> None:
    """The residual is HF PEFT's bit for bit; the factors stay fp32 where HF PEFT rounds them to the base dtype."""
    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 12)).to(dtype)

    model = pk.apply(base(), pk.LoRA(target_modules=["0", "2"], rank=4, alpha=8, init=init))
    hf = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                     init_lora_weights=init))
    for i in (0, 2):
        layer, other = model[i], hf.base_model.model[i]
        assert layer.base_layer.weight.dtype == dtype and torch.equal(layer.base_layer.weight, other.base_layer.weight)
        A = layer.lora_A["default"].weight
        assert A.dtype == torch.float32 and not torch.equal(A, A.to(dtype).float())
        assert torch.equal(A.to(dtype).float(), other.lora_A["default"].weight)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = nn.Sequential(*(m.float() for m in base()))(x)  # the original weights, without rounding
        mine = (model(x.to(dtype)).float() - want).abs().max()
        assert mine <= (hf(x.to(dtype)).float() - want).abs().max() + 1e-3
        assert mine < (2e-2 if dtype == torch.bfloat16 else 3e-3)


# ------------------------------------------------------------------------------------ conversion to plain LoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_equals_hf_peft_conversion(init: str, tmp_path: Path) -> None:
    patterns = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}
    model = train(ours("llama", init, **patterns))
    pk.save_adapter(model, tmp_path / "pk", convert_to_lora=True)

    assert_hf_conversion_matches(theirs("llama", init, **patterns), model, init, tmp_path, atol=1e-6)
    config, hf_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("pk", "hf"))
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert (hf_config["r"], hf_config["lora_alpha"], hf_config["init_lora_weights"]) == (8, 16, True)
    names = module_names(build("llama"))
    for field in ("rank_pattern", "alpha_pattern"):
        assert hf_pattern(config[field], names) == hf_pattern(hf_config[field], names) != {}


@pytest.mark.parametrize("method,init,kwargs", [
    (pk.LoRA, "pissa", {}),
    (pk.LoRA, "pissa_niter_4", {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 5}}),
    (pk.LoRA, "olora", {"modules_to_save": ["lm_head"]}),
    (pk.DoRA, "pissa", {}),
])
def test_converted_adapter_on_the_original_model_gives_the_trained_logits(method: type, init: str, kwargs: dict,
                                                                         tmp_path: Path) -> None:
    """In peftkit and in HF PEFT; rsLoRA with rank/α patterns too, which HF PEFT cannot convert but loads."""
    torch.manual_seed(3)
    model = train(pk.apply(build("llama"), method(target_modules=TARGETS["llama"], rank=4, alpha=8, init=init,
                                                  **kwargs)))
    want = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pk.save_adapter(model, tmp_path, convert_to_lora=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is unchanged
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    grow = math.sqrt(2) if kwargs.get("use_rslora") else 2
    assert config["init_lora_weights"] is True and config["r"] == 8
    assert config["lora_alpha"] == pytest.approx(8 * grow) and config["use_dora"] == (method is pk.DoRA)

    plain = pk.load_adapter(build("llama"), tmp_path)
    assert pk.list_adapters(plain) == ["default"] and plain.get_parameter(
        "model.layers.0.self_attn.q_proj.lora_A.default.weight").shape[0] == 8
    torch.testing.assert_close(logits(plain), want, rtol=0, atol=1e-5)
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_reloads_on_the_original_model_both_ways(init: str, tmp_path: Path) -> None:
    """As HF PEFT: the file says ``init_lora_weights: "pissa"``, and loading recomputes the residual from the
    original weights before the trained factors replace the initial ones."""
    model = train(ours("llama", init))
    want = logits(model)
    pk.save_adapter(model, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["init_lora_weights"] == init
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "pk")).eval()
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-5)
    hf.save_pretrained(str(tmp_path / "hf"))
    back = pk.load_adapter(build("llama"), tmp_path / "hf", trainable=True)
    assert get_state(back).configs["default"].init == init  # type: ignore[attr-defined]
    torch.testing.assert_close(logits(back), want, rtol=0, atol=1e-5)
    pk.save_adapter(back, tmp_path / "again", convert_to_lora=True)  # the initial factors were recomputed
    plain = pk.load_adapter(build("llama"), tmp_path / "again")
    torch.testing.assert_close(logits(plain), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ merge, unload, delete


@pytest.mark.parametrize("method", [pk.LoRA, pk.DoRA])
def test_merge_unmerge_unload_and_delete(method: type) -> None:
    torch.manual_seed(0)
    model = train(pk.apply(build("llama"), method(target_modules=TARGETS["llama"], rank=4, alpha=8, init="pissa")))
    base, want = logits(build("llama")), logits(model)
    residual = {q: layer.base_layer.weight.clone() for q, layer in lora_layers(model)}
    pk.merge(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    pk.unmerge(model)
    for qualname, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, residual[qualname], rtol=0, atol=1e-6)
    with pk.disable_adapters(model):  # the residual model, as in HF PEFT
        assert (logits(model) - base).abs().max() > 1e-3

    pk.delete_adapter(model, "default")  # gives the base weights back what the initialisation took
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=1e-5)

    torch.manual_seed(0)
    merged = pk.unload(train(pk.apply(build("llama"), method(target_modules=TARGETS["llama"], rank=4, alpha=8,
                                                               init="pissa"))))
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-5)
    dropped = pk.unload(ours("llama", "pissa"), merge=False)  # the residual model, as HF PEFT's unload()
    assert not lora_layers(dropped) and (logits(dropped) - base).abs().max() > 1e-3


def test_failed_load_gives_the_base_weights_back(tmp_path: Path) -> None:
    pk.save_adapter(ours("llama", "pissa", rank_pattern={"v_proj": 2}), tmp_path)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("v_proj.lora_A.weight"))
    from safetensors.torch import save_file

    save_file({**weights, key: torch.zeros(3, weights[key].shape[1])}, str(tmp_path / "adapter_model.safetensors"))
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError):
        pk.load_adapter(model, tmp_path)
    assert model.state_dict().keys() == before.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_inspect_leaves_the_model_alone() -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pk.inspect(model, pk.LoRA(target_modules=TARGETS["llama"], rank=4, init="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("kwargs,match", [
    ({"init": "pissa_niter_"}, r"init='pissa_niter_' must be one of \('pissa', 'pissa_niter_<N>', 'olora'"),
    ({"init": "pissa_niter_x"}, r"init='pissa_niter_x' must be one of"),
    ({"init": "LoftQ"}, r"init='LoftQ' must be one of"),
    ({"init": True}, r"init=True must be one of"),
    ({"init": "pissa", "init_A": "gaussian"}, r"leave init_A and init_B at their defaults"),
    ({"init": "olora", "lora_bias": True}, r"lora_bias=True is not supported with init='olora'"),
    ({"init": "orthogonal", "rank": 3}, r"needs even ranks.*rank=3"),
    ({"init": "orthogonal", "rank_pattern": {"v_proj": 5}}, r"rank_pattern\['v_proj'\]=5"),
])
def test_invalid_init_names_value_and_allowed_forms(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.LoRA(target_modules=["q_proj"], **kwargs)


def test_hf_spelling_and_other_methods_name_the_field() -> None:
    with pytest.raises(UnknownFieldError, match=r"'init_lora_weights' is HF PEFT's name: use init='pissa'"):
        pk.LoRA(target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ConfigError, match=r"CanonicalLoRA does not support init='pissa'"):
        pk.CanonicalLoRA(target_modules=["q_proj"], init="pissa")


@pytest.mark.parametrize("arch,kwargs,match", [
    ("llama", {"target_modules": ["q_proj", "embed_tokens"]}, r"linear-like layers only.*'model.embed_tokens' is a "
                                                               r"Embedding.*exclude_modules"),
    ("convnet", {"target_modules": ["conv1", "proj"]}, r"'conv1' is a Conv1d"),
    ("llama", {"target_modules": ["v_proj"], "rank": 20}, r"takes 20 directions of 'model.layers.0.self_attn.v_proj'"
                                                          r"'s weight, which has only 16"),
    ("gpt2", {"target_modules": ["c_attn"], "init": "olora"}, r"init='olora' is not supported on "
                                                              r"'transformer.h.0.attn.c_attn' \(Conv1D"),
    ("llama", {"target_modules": ["linear_qkv"]}, r"cannot share one A"),
    ("gpt2", {"target_modules": ["c_attn", "lm_head"]}, r"init='pissa' rewrites the weight of 'lm_head', which "
                                                        r"\['transformer.wte'\] share \(tied embeddings"),
])
def test_unsupported_targets_are_refused_before_the_model_changes(arch: str, kwargs: dict, match: str) -> None:
    model = build(arch) if arch != "convnet" else ConvNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        pk.apply(model, pk.LoRA(**{"rank": 4, "init": "pissa", **kwargs}))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_blocks_an_earlier_adapter_replicated_are_refused() -> None:
    """The second adapter names no layer_replication of its own, but its targets sit on the model's shared blocks."""
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"init='olora' rewrites the weight of 'model.layers.1.self_attn.v_proj', "
                                          r"which \['model.layers.2.self_attn.v_proj'\] share"):
        pk.apply(model, pk.LoRA(target_modules=["v_proj"], rank=4, init="olora"), name="second")
    assert pk.list_adapters(model) == ["default"] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantized_base_is_refused_for_pissa_but_takes_orthogonal() -> None:
    model = pk.quantize(build("llama"), bits=4)
    with pytest.raises(ConfigError, match=r"init='pissa' rewrites the base weight, which needs a float one.*"
                                          r"Linear4bit.*unquantized model"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=4, init="pissa"))
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=4, init="orthogonal"))
    layer = lora_layers(model)[0][1]
    A, B = layer.factor_weights("default")
    assert A.abs().sum() > 0 and (B @ A).abs().max() < 1e-6


def test_operations_that_would_break_the_residual_are_refused(tmp_path: Path) -> None:
    model = ours("llama", "pissa")
    pk.apply(model, pk.LoRA(target_modules=TARGETS["llama"], rank=4), name="plain")
    for call, match in [
        (lambda: pk.combine(model, {"default": 0.5, "plain": 0.5}, name="mix"), r"pk.combine does not support"),
        (lambda: pk.prune(model, "default"), r"pk.prune does not support adapter 'default'"),
        (lambda: pk.convert(model, to="canonical", name="default"), r"converting between layouts does not support"),
        (lambda: pk.save_adapter(model, tmp_path, convert_to_lora=True), r"adapter 'plain' did not change the base"),
        (lambda: pk.save_adapter(model, tmp_path, "default", convert_to_lora=True, layout="canonical"),
         r"convert_to_lora and layout cannot be combined"),
    ]:
        with pytest.raises(ConfigError, match=match):
            call()
    assert not list(tmp_path.iterdir())  # nothing was written
