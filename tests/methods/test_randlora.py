"""RandLoRA against HF PEFT's RANDLORA: the shared bases (dense, sparse, very sparse), initialisation, forward,
gradients, merging, several adapters, files both ways and errors, on a tiny Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, UnknownFieldError, UnsupportedLayerError
from peftkit.methods.randlora import RandLoRALayer, dense_bases, num_bases
from peftkit.train.config import PEFT_METHODS

from models import build, run, train_losses

peft = pytest.importorskip("peft")

#: arch → targets: Llama's q_proj is 32 → 32 and down_proj 64 → 32; GPT-2's c_attn 32 → 96 and mlp.c_proj 128 → 32.
TARGETS = {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
RANK = 8
#: HF PEFT's alpha (640) would swamp a 32-wide model: a small one keeps the logits sane.
ALPHA = 16
SPARSITY = [{}, {"sparse": True}, {"very_sparse": True}]


def hf_randlora(arch: str, seed: int = 3, base: nn.Module | None = None, **options: Any) -> Any:
    config = peft.RandLoraConfig(**{"target_modules": TARGETS[arch], "r": RANK, "randlora_alpha": ALPHA,
                                    "init_weights": False, **options})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out on GPT-2, save_projection=False
        return peft.get_peft_model(build(arch) if base is None else base, config).eval()


def ours(arch: str, seed: int = 3, base: nn.Module | None = None, **options: Any) -> nn.Module:
    config = pk.RandLoRA(**{"target_modules": TARGETS[arch], "rank": RANK, "alpha": ALPHA, "init_weights": False,
                            **options})
    torch.manual_seed(seed)
    return pk.apply(build(arch) if base is None else base, config).eval()


def inner_state(hf: Any) -> dict[str, torch.Tensor]:
    """HF PEFT's state dict under the wrapped model's keys (peftkit's: the model is not wrapped)."""
    return {k.removeprefix("base_model.model."): v for k, v in hf.state_dict().items()
            if k.startswith("base_model.model.")}


def copy_adapter(hf: Any, model: nn.Module, name: str = "default") -> None:
    """HF PEFT's λ and γ of adapter ``name`` into ``model``."""
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in inner_state(hf).items():
            if (".randlora_lambda." in key or ".randlora_gamma." in key) and key.endswith(f".{name}"):
                own[key].copy_(value)


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return run(model, arch)


def layers(model: nn.Module) -> list[RandLoRALayer]:
    return [m for m in model.modules() if isinstance(m, RandLoRALayer)]


# -- the bases and the initialisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("options", SPARSITY + [{"projection_prng_key": 1234}])
def test_bases_are_hf_peft_s_for_the_same_key(arch: str, options: dict[str, Any]) -> None:
    hf, model = hf_randlora(arch, **options), ours(arch, **options)
    found = layers(model)
    assert len(found) == 4 and all(m.randlora_A is found[0].randlora_A for m in found)  # one shared pair
    for attr in ("randlora_A", "randlora_B"):
        assert torch.equal(getattr(found[0], attr)["default"], getattr(hf.base_model, attr)["default"]), attr
    # Sized by the largest output and input among the targets: GPT-2's (96, 128) → A (r, 1, 96), B (128, 12, r).
    want = {"llama": ((RANK, 1, 32), (64, 4, RANK)), "gpt2": ((RANK, 1, 96), (128, 12, RANK))}[arch]
    assert (tuple(found[0].randlora_A["default"].shape), tuple(found[0].randlora_B["default"].shape)) == want
    if not options.get("sparse") and not options.get("very_sparse"):
        basis_a, basis_b = dense_bases(RANK, want[0][2], want[1][0], options.get("projection_prng_key", 0))
        assert torch.equal(basis_a, found[0].randlora_A["default"])
        assert torch.equal(basis_b, found[0].randlora_B["default"])
        assert torch.equal(basis_a.bfloat16().float(), basis_a)  # drawn in bfloat16, as HF PEFT draws them
    else:
        assert len(found[0].randlora_A["default"].unique()) == 3  # ternary


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("init_weights", [False, True])
def test_initialisation_forward_and_counts_equal_hf(arch: str, init_weights: bool) -> None:
    hf, model = hf_randlora(arch, init_weights=init_weights), ours(arch, init_weights=init_weights)
    theirs, mine = inner_state(hf), model.state_dict()
    assert set(mine) == set(theirs)  # the bases under every layer too, as HF PEFT's BufferDict
    for key, value in theirs.items():  # λ drawn from the global generator in HF PEFT's order, γ set alike
        assert torch.equal(mine[key], value), key
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())
    assert pk.inspect(build(arch), pk.RandLoRA(target_modules=TARGETS[arch], rank=RANK)).added_params == \
        hf.get_nb_trainable_parameters()[0]
    expected = logits(hf, arch)
    torch.testing.assert_close(logits(model, arch), expected, rtol=0, atol=1e-6)
    assert torch.equal(logits(model, arch), logits(build(arch), arch)) is init_weights  # λ = 0: the base output


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base λ, γ and the bases are rounded to bf16 and kept in fp32, as HF PEFT does."""
    for options in ({}, {"sparse": True}):
        hf = hf_randlora("llama", base=build("llama").to(torch.bfloat16), **options)
        model = ours("llama", base=build("llama").to(torch.bfloat16), **options)
        theirs, mine = inner_state(hf), model.state_dict()
        for key, value in theirs.items():
            if "randlora_" in key:
                assert mine[key].dtype == value.dtype == torch.float32 and torch.equal(mine[key], value), key
        assert torch.equal(logits(model, "llama"), logits(hf, "llama"))


@pytest.mark.parametrize(("in_features", "out_features"), [(5, 11), (11, 5), (6, 6)])
def test_layer_formula_pairs_the_flattened_bases_as_hf_peft(in_features: int, out_features: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    model = nn.Sequential(base)
    pk.apply(model, pk.RandLoRA(target_modules=["0"], rank=2, alpha=3.0, init_weights=False))
    layer = model[0]
    assert isinstance(layer, RandLoRALayer)
    small, large = min(in_features, out_features), max(in_features, out_features)
    n = num_bases(small, 2)
    basis_a, basis_b = dense_bases(2, small, large, 0)
    lam, gamma = layer.randlora_lambda["default"].detach(), layer.randlora_gamma["default"].detach()
    delta = torch.zeros(large, small)
    for k in range(2):  # row k·n + c of the scaled A meets column k·n + c of B flattened basis-major
        for c in range(n):
            i = k * n + c
            delta += torch.outer(basis_b[:, i // 2, i % 2], lam[k, c] * basis_a[k, 0] * gamma[c])
    delta = delta * 3.0 / 2 if in_features == small else delta.T * 3.0 / 2
    x = torch.randn(4, in_features)
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(TARGETS))
def test_gradients_equal_hf(arch: str) -> None:
    hf, model = hf_randlora(arch), ours(arch)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    hf(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    mine = dict(model.named_parameters())
    theirs = {n.removeprefix("base_model.model."): p for n, p in hf.named_parameters() if p.requires_grad}
    assert set(theirs) == {n for n, p in mine.items() if p.requires_grad}
    for name, param in theirs.items():
        assert param.grad is not None and mine[name].grad is not None, name
        torch.testing.assert_close(mine[name].grad, param.grad, rtol=1e-5, atol=1e-6), name


# -- merging and several adapters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TARGETS))
def test_merge_unmerge_disable_and_unload_equal_hf(arch: str) -> None:
    hf, model = hf_randlora(arch), ours(arch)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    expected, base = logits(model, arch), logits(build(arch), arch)
    with torch.no_grad():
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        pk.merge(model, safe=True)
        assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        torch.testing.assert_close(run(model, arch), expected, rtol=0, atol=1e-5)
        pk.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        plain = pk.unload(model, merge=True)
        reference = dict(hf.merge_and_unload().named_parameters())
        for n, p in plain.named_parameters():
            torch.testing.assert_close(p, reference[n], rtol=0, atol=1e-6)
        assert not layers(plain)
        torch.testing.assert_close(run(plain, arch), expected, rtol=0, atol=1e-5)


def test_two_adapters_share_the_bases_and_sum_as_in_hf_peft() -> None:
    hf, model = hf_randlora("llama"), ours("llama")
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.add_adapter("other", peft.RandLoraConfig(target_modules=["q_proj"], r=RANK, randlora_alpha=8,
                                                    init_weights=False))
    torch.manual_seed(4)
    pk.apply(model, pk.RandLoRA(target_modules=["q_proj"], rank=RANK, alpha=8, init_weights=False), name="other")
    for names in (["other"], ["default", "other"]):
        hf.base_model.set_adapter(names)
        pk.set_adapter(model, names)
        torch.testing.assert_close(logits(model, "llama"), logits(hf, "llama"), rtol=0, atol=1e-6)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.randlora_A["other"] is layer.randlora_A["default"]
    with torch.no_grad():
        with pk.disable_adapters(model):
            assert torch.equal(run(model, "llama"), run(build("llama"), "llama"))
        pk.merge(model)  # both active adapters folded in: the same output
        torch.testing.assert_close(run(model, "llama"), logits(hf, "llama"), rtol=0, atol=1e-5)
        pk.unmerge(model)
    pk.delete_adapter(model, "default")
    pk.set_adapter(model, "other")
    hf.base_model.set_adapter("other")
    torch.testing.assert_close(logits(model, "llama"), logits(hf, "llama"), rtol=0, atol=1e-6)
    assert not isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), RandLoRALayer)
    pk.delete_adapter(model, "other")
    assert not layers(model)
    pk.apply(model, pk.RandLoRA(target_modules=["v_proj"], rank=4, projection_prng_key=3))  # none left: new bases


@pytest.mark.parametrize(("options", "message"), [
    ({"projection_prng_key": 1}, "projection_prng_key=1 differs"),
    ({"rank": 4}, "rank=4 differs"),
    ({"save_projection": False}, "save_projection=False differs"),
    ({"sparse": True}, "sparse=True differs"),
    ({"very_sparse": True}, "very_sparse=True differs"),
])
def test_a_second_adapter_must_agree_on_the_shared_bases(options: dict[str, Any], message: str) -> None:
    model = ours("llama")
    before = model.state_dict()
    with pytest.raises(ConfigError, match=message):
        pk.apply(model, pk.RandLoRA(target_modules=["q_proj"], **{"rank": RANK, **options}), name="other")
    assert pk.list_adapters(model) == ["default"] and set(model.state_dict()) == set(before)


def test_hf_peft_takes_a_second_rank_and_fails_in_the_forward() -> None:
    """Why peftkit refuses another rank up front: HF PEFT 0.21.2 accepts it, then cannot compute the adapter."""
    hf = hf_randlora("llama")
    hf.add_adapter("other", peft.RandLoraConfig(target_modules=["q_proj"], r=4))
    hf.base_model.set_adapter("other")
    with pytest.raises(RuntimeError, match="must match the size"):
        logits(hf, "llama")


def test_a_second_adapter_must_fit_the_shared_bases() -> None:
    model = pk.apply(build("llama"), pk.RandLoRA(target_modules=["q_proj"], rank=RANK))  # 32 × 32 at most
    with pytest.raises(ConfigError, match="does not fit the shared RandLoRA bases"):
        pk.apply(model, pk.RandLoRA(target_modules=["down_proj"], rank=RANK), name="other")  # 64 features
    hf = peft.get_peft_model(build("llama"), peft.RandLoraConfig(target_modules=["q_proj"], r=RANK))
    with pytest.raises(ValueError, match="randlora_B has a size of 32 but 64"):  # HF PEFT refuses it too
        hf.add_adapter("other", peft.RandLoraConfig(target_modules=["down_proj"], r=RANK))


# -- files -----------------------------------------------------------------------------------------------------------
#: The config fields HF PEFT's RandLoraConfig reads (targets: compared as the modules HF PEFT adapts).
FIELDS = ("r", "projection_prng_key", "save_projection", "sparse", "very_sparse", "randlora_dropout",
          "fan_in_fan_out", "randlora_alpha", "bias", "modules_to_save", "init_weights", "peft_type")


def _shapes(directory: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("options", [{}, {"save_projection": False}, {"very_sparse": True, "save_projection": False},
                                     {"sparse": True, "randlora_dropout": 0.1}])
def test_files_cross_load_with_hf_peft_both_ways(arch: str, options: dict[str, Any], tmp_path) -> None:
    hf = hf_randlora(arch, **options)
    expected = logits(hf, arch)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")  # without bases: drawn again from the key
    torch.testing.assert_close(logits(loaded, arch), expected, rtol=0, atol=1e-6)

    fields = {("dropout" if k == "randlora_dropout" else k): v for k, v in options.items()}
    model = ours(arch, **fields)
    copy_adapter(hf, model)
    pk.save_adapter(model, tmp_path / "pk")
    assert _shapes(tmp_path / "pk") == _shapes(tmp_path / "hf")  # the same keys, shapes and dtypes
    assert ("base_model.randlora_A" in _shapes(tmp_path / "pk")) == options.get("save_projection", True)
    mine, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pk", "hf"))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    ours_json = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hf_json = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert {f: ours_json[f] for f in FIELDS} == {f: hf_json[f] for f in FIELDS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    torch.testing.assert_close(logits(back, arch), expected, rtol=0, atol=1e-6)
    assert sorted(back.base_model.targeted_module_names) == sorted(hf.base_model.targeted_module_names)
    again = pk.load_adapter(build(arch), tmp_path / "pk")
    assert torch.equal(logits(again, arch), logits(model, arch))


def test_saved_bases_are_loaded_not_redrawn(tmp_path) -> None:
    model = ours("llama")
    with torch.no_grad():  # bases from elsewhere (another machine's draw): the file's are used
        layers(model)[0].randlora_A["default"].mul_(1.5)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(build("llama"), tmp_path)
    assert torch.equal(logits(loaded, "llama"), logits(model, "llama"))
    back = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(logits(back, "llama"), logits(model, "llama"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", ["randlora_only", "all"])
def test_trained_biases_match_hf_peft_and_cross_load(bias: str, tmp_path) -> None:
    hf = hf_randlora("gpt2", bias=bias)
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
    torch.testing.assert_close(logits(loaded, "gpt2"), logits(hf, "gpt2"), rtol=0, atol=1e-6)
    pk.save_adapter(loaded, tmp_path / "pk")
    assert _shapes(tmp_path / "pk") == _shapes(tmp_path / "hf")


# -- errors, defaults, training --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "error", "message"), [
    ({"rank": 0}, ConfigError, "rank=0 must be an integer >= 1"),
    ({"rank": 2.5}, ConfigError, "rank=2.5"),
    ({"alpha": float("inf")}, ConfigError, "alpha=inf must be a finite number"),
    ({"alpha": "big"}, ConfigError, "alpha='big'"),
    ({"projection_prng_key": 1.5}, ConfigError, "projection_prng_key=1.5 must be an integer"),
    ({"dropout": 1.0}, ConfigError, r"dropout=1.0 must be in \[0, 1\)"),
    ({"bias": "lora_only"}, ConfigError, "bias='lora_only' must be one of"),
    ({"sparse": "yes"}, ConfigError, "sparse='yes' must be True or False"),
    ({"save_projection": None}, ConfigError, "save_projection=None"),
    ({"randlora_alpha": 8}, UnknownFieldError, "'randlora_alpha'"),
    ({"r": 8}, UnknownFieldError, "HF PEFT's name: use rank"),
])
def test_bad_options_are_refused_by_name(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        pk.RandLoRA(target_modules=["q_proj"], **options)


def test_unsupported_layers_are_refused_as_in_hf_peft() -> None:
    for targets, hf_message in ((["embed_tokens"], "No layers types compatible"),
                                (["q_proj", "embed_tokens"], "Embedding.*is not supported")):
        model = build("llama")
        with pytest.raises(UnsupportedLayerError, match="Embedding"):
            pk.apply(model, pk.RandLoRA(target_modules=targets))
        assert not layers(model)
        with pytest.raises(ValueError, match=hf_message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(build("llama"), peft.RandLoraConfig(target_modules=targets, r=4))
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        pk.apply(nn.Sequential(nn.Conv2d(2, 2, 1)), pk.RandLoRA(target_modules=["0"], rank=2))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_omitted_targets_are_hf_peft_s_defaults(arch: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build(arch), peft.RandLoraConfig(r=8))
    model = pk.apply(build(arch), pk.RandLoRA(rank=8))
    assert {n for n, m in model.named_modules() if isinstance(m, RandLoRALayer)} == \
        set(hf.base_model.targeted_module_names)
    assert torch.equal(layers(model)[0].randlora_B["default"], hf.base_model.randlora_B["default"])  # sized alike


def test_quantized_layers_compute_with_their_dequantized_weight() -> None:
    """As HF PEFT adapts bitsandbytes' 8-bit and 4-bit linears, RandLoRA adapts quantized linear layers: the update
    is added to the quantized layer's output; merging re-quantizes (not exact)."""
    quantized = pk.quantize(build("llama"), compute_dtype=torch.float32)
    plain = pk.unload(copy.deepcopy(quantized), merge=False, dequantize=True)  # the same weights, in float
    for model in (quantized, plain):
        torch.manual_seed(0)
        pk.apply(model, pk.RandLoRA(target_modules=["q_proj", "down_proj"], rank=4, alpha=8, init_weights=False))
    assert len(layers(quantized)) == 4
    expected = logits(plain, "llama")
    torch.testing.assert_close(logits(quantized, "llama"), expected, rtol=1e-5, atol=1e-5)
    with pk.disable_adapters(quantized):
        assert not torch.allclose(logits(quantized, "llama"), expected, atol=1e-4)
    pk.merge(quantized, safe=True)
    torch.testing.assert_close(logits(quantized, "llama"), expected, rtol=0, atol=0.05)


def test_training_lowers_the_loss_and_the_method_is_known_by_name() -> None:
    model = build("llama").train()
    pk.apply(model, pk.RandLoRA(target_modules=["q_proj", "v_proj", "down_proj"], rank=8, alpha=32))
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.05)
    assert losses[-1] < losses[0] - 0.01
    assert getattr(pk, str(PEFT_METHODS["randlora"])) is pk.RandLoRA
