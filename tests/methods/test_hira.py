"""HiRA against HF PEFT: the Hadamard update, initialisation (every init, fp32 and bf16 bases), forward, gradients
(with dropout too), files both ways, merging, several adapters and errors, on nn.Linear (a tiny Llama), GPT-2's Conv1D,
and the embedding and convolutions of a small conv net."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_prompt import batch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.hira import HiRALayer
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_match_hf,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    check_two_adapters_as_hf,
    randomize_trainable,
    run,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

FIELDS: dict[str, Any] = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
#: Targets per architecture: linears, GPT-2's Conv1D, and an embedding with two convolutions.
TARGETS = {"llama": FIELDS["target_modules"], "gpt2": ["c_attn", "c_proj"], "convnet": ["embed", "conv1", "conv2"]}
#: HF PEFT's names for peftkit's fields.
HF_NAMES = {"rank": "r", "dropout": "hira_dropout", "layers": "layers_to_transform"}


def hf_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    theirs = {HF_NAMES.get(k, k): v for k, v in {"target_modules": TARGETS[arch], **fields}.items()}
    if arch != "convnet":
        theirs.setdefault("task_type", "CAUSAL_LM")
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.HiraConfig(**theirs)).eval()


def ours_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return pk.apply(base, pk.HiRA(**{"target_modules": TARGETS[arch], **fields}))


def copy_hf_tensors(hf: nn.Module, ours: nn.Module, seed: int = 0) -> None:
    """Random tensors in HF PEFT's trainable tensors (B non-zero), copied into peftkit's."""
    randomize_trainable(hf, scale=0.3, seed=seed)
    mine = trainable_tensors(ours)
    with torch.no_grad():
        for name, tensor in trainable_tensors(hf).items():
            mine[name].copy_(tensor)


def test_the_update_is_the_hadamard_product_written_out_and_of_high_rank() -> None:
    torch.manual_seed(0)
    layer = HiRALayer(nn.Linear(12, 8))
    layer.add("default", rank=2, dropout=0.0, init_weights=False)
    layer.set_active(["default"])
    a, b = layer.hira_A["default"].detach(), layer.hira_B["default"].detach()
    weight = layer.base_layer.weight.detach()
    expected = weight * (b @ a)  # ΔW = W₀ ⊙ (B A)
    delta = layer.delta_weight("default")
    assert torch.allclose(delta, expected)
    assert int(torch.linalg.matrix_rank(delta)) == 8 > 2  # rank 2 factors, a full-rank update
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-6)


@pytest.mark.parametrize("init_weights", [True, False, "gaussian"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "convnet"])
def test_initialisation_and_forward_equal_hf(arch: str, init_weights: bool | str) -> None:
    """The same draws from the global generator in HF PEFT's order for each layer type; bit-equal outputs."""
    hf, ours = hf_model(arch, init_weights=init_weights, rank=3), ours_model(arch, init_weights=init_weights, rank=3)
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        result, expected, base = run(ours, arch), run(hf, arch), run(build(arch), arch)
    assert torch.equal(result, expected)
    assert torch.equal(result, base) is (init_weights is not False)  # B = 0 (A = 0 on embeddings): unchanged


def test_bf16_base_rounds_the_factors_and_keeps_them_in_fp32_as_hf() -> None:
    hf = hf_model(dtype=torch.bfloat16, init_weights=False, rank=4)
    ours = ours_model(dtype=torch.bfloat16, init_weights=False, rank=4)
    assert_same_tensors_as_hf(ours, hf)
    assert all(t.dtype == torch.float32 for t in trainable_tensors(ours).values())
    inputs = batch("llama")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, hf(**inputs).logits)


def test_default_targets_are_hf_peft_s() -> None:
    hf, ours = hf_model(target_modules=None), ours_model(target_modules=())
    assert sorted(trainable_tensors(ours)) == sorted(trainable_tensors(hf))
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable_tensors(ours))


def test_gradients_equal_hf_with_dropout_too() -> None:
    hf, ours = hf_model(), ours_model()
    copy_hf_tensors(hf, ours)
    assert_gradients_match_hf(hf, ours, batch("llama"), "hira_")
    hf, ours = hf_model(dropout=0.3), ours_model(dropout=0.3)
    copy_hf_tensors(hf, ours)
    hf.train()
    ours.train()
    inputs = batch("llama")
    for model in (hf, ours):
        torch.manual_seed(7)  # the same masks, drawn in the same order
        model(**inputs).loss.backward()
    mine = trainable_tensors(ours)
    for name, tensor in trainable_tensors(hf).items():
        assert torch.allclose(mine[name].grad, tensor.grad, atol=1e-6), name


@pytest.mark.parametrize("arch", ["gpt2", "convnet"])
def test_gradients_on_conv1d_embeddings_and_convolutions_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    copy_hf_tensors(hf, ours)
    assert_same_grads_as_hf(ours, hf, lambda m: run(m, arch), atol=1e-5)


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"init_weights": False, "layers": [1], "layers_pattern": "layers", "dropout": 0.1}),
    ("llama", {"init_weights": "gaussian", "target_modules": ["q_proj"],
               "exclude_modules": ["layers.0.self_attn.q_proj"]}),
    ("gpt2", {"rank": 2}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    assert_same_tensors_as_hf(ours, hf)  # the layers
    copy_hf_tensors(hf, ours)
    # rank_pattern, target_modules and the layer selection as given in HF PEFT; peftkit names the exact modules (the
    # tensor keys show that both select the same). GPT-2: fan_in_fan_out=True, set as HF PEFT sets it.
    assert_files_match_hf(hf, ours, arch, batch(arch), tmp_path, loose=(
        "target_modules", "exclude_modules", "rank_pattern", "layers_to_transform", "layers_pattern",
        *(("fan_in_fan_out",) if arch == "gpt2" else ())))
    written = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert written["peft_type"] == "HIRA" and written["fan_in_fan_out"] is (arch == "gpt2")


def test_rank_pattern_sets_the_ranks_which_hf_ignores(tmp_path: Path) -> None:
    """A deliberate difference: HF PEFT 0.21.2's HiRA builds every new layer at rank r whatever rank_pattern says
    (its dispatcher reads ``r`` from the config, not the pattern's), and so cannot load a file whose ranks follow the
    pattern. peftkit applies the pattern, writes it, and reads its own file back."""
    fields: dict[str, Any] = {"rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6}, "rank": 3,
                              "init_weights": False}
    hf, ours = hf_model(**fields), ours_model(**fields)
    assert {p.shape[0] for n, p in trainable_tensors(hf).items() if "hira_A" in n} == {3}  # HF PEFT: the pattern lost
    layers = ours.model.layers
    assert [layers[i].mlp.down_proj.hira_A["default"].shape[0] for i in (0, 1)] == [3, 6]
    assert layers[1].self_attn.v_proj.hira_B["default"].shape == (16, 2)
    pk.save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 2 for i in (0, 1)} | {
        "model.layers.1.mlp.down_proj": 6}
    inputs = batch("llama")
    with torch.no_grad():
        assert torch.equal(pk.load_adapter(build("llama"), tmp_path)(**inputs).logits, ours(**inputs).logits)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(build("llama"), str(tmp_path))


def test_embedding_and_convolution_files_load_both_ways(tmp_path: Path) -> None:
    hf, ours = hf_model("convnet", init_weights=False), ours_model("convnet")
    copy_hf_tensors(hf, ours)
    with torch.no_grad():
        want = run(hf, "convnet")
    hf.save_pretrained(str(tmp_path / "hf"))
    pk.save_adapter(ours, tmp_path / "pk")
    from safetensors.torch import load_file

    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "pk"))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], v) for k, v in theirs.items())
    assert "base_model.model.embed.hira_embedding_A" in mine
    loaded = pk.load_adapter(build("convnet"), tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(build("convnet"), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.equal(run(loaded, "convnet"), want) and torch.equal(run(back, "convnet"), want)


def test_merge_unmerge_and_unload_equal_hf() -> None:
    hf, ours = hf_model(), ours_model()
    copy_hf_tensors(hf, ours)
    assert_merges_as_hf(hf, ours, batch("llama"), HiRALayer)


def test_merging_embeddings_and_convolutions_keeps_the_outputs_and_restores_w0_exactly() -> None:
    hf, ours = hf_model("convnet"), ours_model("convnet")
    copy_hf_tensors(hf, ours)
    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = run(ours, "convnet")
        pk.merge(ours, safe=True)
        torch.testing.assert_close(run(ours, "convnet"), want, rtol=0, atol=1e-5)
        pk.unmerge(ours)
        assert all(torch.equal(p, weights[n]) for n, p in ours.named_parameters())  # W₀ restored bit for bit
        theirs = dict(hf.merge_and_unload().named_parameters())
        for n, p in pk.unload(ours, merge=True).named_parameters():
            torch.testing.assert_close(p, theirs[n], rtol=0, atol=1e-6, msg=n)


def test_a_merged_adapter_leaves_another_active_one_modulating_w0() -> None:
    """With one adapter merged, W holds W₀ ⊙ (1 + M₁): the other still modulates W₀ (kept), so the output is the
    unmerged one; unmerging one at a time, last first, ends at W₀ exactly."""
    ours = ours_model(init_weights=False)
    pk.apply(ours, pk.HiRA(**FIELDS, init_weights=False, rank=2), name="other")
    pk.set_adapter(ours, ["default", "other"])
    weight = ours.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    inputs = batch("llama")
    with torch.no_grad():
        want = ours(**inputs).logits
        pk.merge(ours, ["default"])
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=1e-5)
        pk.merge(ours, ["other"])
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=1e-5)
        pk.unmerge(ours)
        assert torch.equal(ours.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
        assert ours.model.layers[0].self_attn.q_proj._original is None


def test_quantized_linears_modulate_the_dequantized_weight_and_unmerge_to_it() -> None:
    """As HF PEFT on bitsandbytes' linears: W₀ is the dequantized weight; merging re-quantizes W₀ ⊙ (1 + B A), and
    unmerging re-quantizes the kept W₀ (each within the quantization's rounding)."""
    quantized = pk.quantize(build("llama"), compute_dtype=torch.float32)
    plain = pk.unload(copy.deepcopy(quantized), merge=False, dequantize=True)  # the same weights, in float
    for model in (quantized, plain):
        torch.manual_seed(5)
        pk.apply(model, pk.HiRA(**FIELDS, rank=2, init_weights=False))
    randomize_trainable(quantized, scale=0.7, seed=1)
    randomize_trainable(plain, scale=0.7, seed=1)
    with torch.no_grad():
        expected = run(plain, "llama")
        torch.testing.assert_close(run(quantized, "llama"), expected, rtol=1e-5, atol=1e-5)
        with pk.disable_adapters(quantized):
            base = run(quantized, "llama")
        pk.merge(quantized)
        assert (run(quantized, "llama") - expected).abs().max() < 0.2 * (expected - base).abs().max()
        pk.unmerge(quantized)
        assert (run(quantized, "llama") - expected).abs().max() < 0.2 * (expected - base).abs().max()
        assert quantized.model.layers[0].self_attn.q_proj._original is None


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    hf, ours = hf_model(), ours_model()
    torch.manual_seed(4)
    hf.add_adapter("other", peft.HiraConfig(r=2, init_weights=False, target_modules=["v_proj", "o_proj"]))
    torch.manual_seed(4)
    pk.apply(ours, pk.HiRA(rank=2, init_weights=False, target_modules=["v_proj", "o_proj"]), name="other")
    copy_hf_tensors(hf, ours)
    check_two_adapters_as_hf(hf, ours)
    pk.delete_adapter(ours, "other")
    attention = ours.model.layers[0].self_attn
    assert not isinstance(attention.o_proj, HiRALayer) and isinstance(attention.v_proj, HiRALayer)
    assert list(attention.v_proj.hira_A) == ["default"]


def test_unsupported_layers_are_refused_as_in_hf() -> None:
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.LayerNorm(2))
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft.get_peft_model(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), peft.HiraConfig(target_modules=["0"]))
    with pytest.raises(UnsupportedLayerError, match="HiRA cannot adapt 0, a convolution with groups=2"):
        pk.apply(grouped, pk.HiRA(target_modules=["0"]))
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(nn.Sequential(nn.Conv2d(4, 8, 3), nn.LayerNorm(2)), peft.HiraConfig(target_modules=["1"]))
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        pk.apply(grouped, pk.HiRA(target_modules=["1"]))
    assert not any(isinstance(m, HiRALayer) for m in grouped.modules())
    with pytest.raises(UnsupportedLayerError, match="HiRA cannot adapt a GRU; supported layer types: .*Conv3d.*Embed"):
        HiRALayer(nn.GRU(4, 4))


def test_circular_padding_is_honoured_where_hf_pads_with_zeros() -> None:
    """A deliberate difference: HF PEFT's update convolves with zero padding whatever the base's padding_mode, so
    its merged model differs from its unmerged one; peftkit's update pads as the base does, and merging keeps it."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))

    x = torch.randn(2, 3, 5, 5)
    torch.manual_seed(1)
    hf = peft.get_peft_model(model(), peft.HiraConfig(target_modules=["0"], init_weights=False))
    torch.manual_seed(1)
    ours = pk.apply(model(), pk.HiRA(target_modules=["0"], init_weights=False))
    layer = ours[0]
    with torch.no_grad():
        delta = layer.delta_weight("default")
        assert torch.allclose(ours(x), layer.base_layer._conv_forward(x, layer.base_layer.weight + delta,
                                                                     layer.base_layer.bias), atol=1e-5)
        unmerged = ours(x)
        pk.merge(ours)
        torch.testing.assert_close(ours(x), unmerged, rtol=0, atol=1e-5)
        theirs = hf(x)
        hf.merge_adapter()
        assert not torch.allclose(hf(x), theirs, atol=1e-3)  # HF PEFT: merged ≠ unmerged
        torch.testing.assert_close(hf(x), unmerged, rtol=0, atol=1e-5)  # its merged model is peftkit's


def test_errors_name_the_field_and_leave_the_model_unchanged() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"rank": 4.0}, "rank=4.0 must be an integer >= 1"),
        ({"rank_pattern": {"v_proj": -1}}, r"rank_pattern\['v_proj'\]=-1 must be an integer >= 1"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"init_weights": "kaiming"}, "init_weights='kaiming' must be True, False or 'gaussian'"),
        ({"init_weights": 1}, "init_weights=1 must be True, False or 'gaussian'"),
        ({"fan_in_fan_out": "no"}, "fan_in_fan_out='no' must be True or False"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            pk.HiRA(**fields)
    model = build("llama")
    with pytest.raises(ConfigError, match="rank_pattern key 'v_prj' matches no module"):
        pk.apply(model, pk.HiRA(**FIELDS, rank_pattern={"v_prj": 2}))
    assert not any(isinstance(m, HiRALayer) for m in model.modules())
    with pytest.raises(ConfigError, match="sets use_magic=1, an option of HF PEFT's HiRA that peftkit does not"):
        pk.HiRA.from_hf_dict({"peft_type": "HIRA", "target_modules": ["q_proj"], "use_magic": 1}, ["q_proj"])
    assert getattr(pk, str(PEFT_METHODS["hira"])) is pk.HiRA
