"""SHiRA against HF PEFT: random masks, initialisation, forward, gradients, files both ways (random and custom masks),
merging, several adapters and errors, on a tiny Llama; GPT-2's Conv1D refused as HF PEFT refuses it."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import batch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.shira import SHiRALayer, mask_indices, random_mask
from peftkit.train.config import PEFT_METHODS

from models import assert_merges_as_hf, build, check_two_adapters_as_hf

peft = pytest.importorskip("peft")

# HF PEFT's default r=32 trains more entries than a 32-wide layer has: r=2 keeps r·(in + out) below out·in.
FIELDS: dict[str, Any] = {"rank": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def hf_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """peftkit's SHiRA fields under HF PEFT's names."""
    out = {("r" if k == "rank" else k): v for k, v in fields.items() if k != "mask_fn"}
    return {"task_type": "CAUSAL_LM", **out}


def hf_model(seed: int = 3, mask_fn: Any = None, **fields: Any) -> Any:
    config = peft.ShiraConfig(**hf_fields({**FIELDS, **fields}))
    if mask_fn is not None:
        config.mask_fn = mask_fn  # HF PEFT's way: set on the config after construction
    base = build("llama")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a mask_type other than "random"
        return peft.get_peft_model(base, config).eval()


def ours_model(seed: int = 3, **fields: Any) -> nn.Module:
    base = build("llama")
    torch.manual_seed(seed)
    return pk.apply(base, pk.SHiRA(**{**FIELDS, **fields}))


def hf_layers(model: Any) -> dict[str, Any]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "shira_indices")}


def our_layers(model: nn.Module) -> dict[str, SHiRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SHiRALayer)}


def copy_values(hf: Any, model: nn.Module, name: str = "default") -> None:
    """HF PEFT's values of adapter ``name`` into ``model`` (after checking both use the same indices)."""
    mine = our_layers(model)
    with torch.no_grad():
        for path, layer in hf_layers(hf).items():
            if name in layer.shira_weight:
                assert torch.equal(mine[path].shira_indices[name], layer.shira_indices[name]), path
                mine[path].shira_weight[name].copy_(layer.shira_weight[name])


def banded_mask(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
    """A deterministic non-random mask: the first r·(in + out) entries of the weight in column-major order."""
    out_features, in_features = base_layer.weight.shape
    flat = torch.zeros(in_features * out_features)
    flat[: r * (in_features + out_features)] = 1
    return flat.view(in_features, out_features).T.contiguous().to(base_layer.weight)


@pytest.mark.parametrize(("shape", "rank", "seed"), [((32, 32), 2, None), ((16, 32), 3, 0), ((32, 64), 1, 1234)])
def test_random_masks_are_hf_peft_s(shape: tuple[int, int], rank: int, seed: int | None) -> None:
    from peft.tuners.shira.layer import Linear as HFLinear
    from peft.tuners.shira.mask_functions import random_mask as hf_random_mask

    base = nn.Linear(shape[1], shape[0])
    theirs = hf_random_mask(base, rank, random_seed=seed)
    ours = random_mask(shape[0], shape[1], rank, seed)
    assert torch.equal(ours, theirs) and int(ours.sum()) == rank * sum(shape)
    layer = HFLinear(base, theirs, "default", peft.ShiraConfig(r=rank), r=rank)
    indices = mask_indices(ours)
    assert indices.dtype == layer.shira_indices["default"].dtype == torch.int32
    assert torch.equal(indices, layer.shira_indices["default"])


@pytest.mark.parametrize(("init_weights", "seed"), [(False, None), (False, 11), (True, None)])
def test_initialisation_and_forward_equal_hf(init_weights: bool, seed: int | None) -> None:
    hf = hf_model(init_weights=init_weights, random_seed=seed)
    ours = ours_model(init_weights=init_weights, random_seed=seed)
    theirs, mine = hf_layers(hf), our_layers(ours)
    assert sorted(mine) == sorted(theirs) and len(mine) == 6
    for path, layer in mine.items():  # the same masks, and the same draws from the global generator in the same order
        assert torch.equal(layer.shira_indices["default"], theirs[path].shira_indices["default"]), path
        assert torch.equal(layer.shira_weight["default"], theirs[path].shira_weight["default"]), path
    inputs = batch("llama")
    with torch.no_grad():
        expected, result = hf(**inputs), ours(**inputs)
        base = build("llama")(**inputs).logits
    assert torch.allclose(result.logits, expected.logits, atol=1e-6)
    assert torch.allclose(result.loss, expected.loss, atol=1e-6)
    assert torch.equal(result.logits, base) is init_weights  # zero values leave the model as it was
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    assert set(ours.state_dict()) == {k.removeprefix("base_model.model.") for k in hf.state_dict()}


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the values are drawn, rounded to bf16 and kept in fp32, as HF PEFT does."""
    base_hf, base_ours = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    torch.manual_seed(3)
    hf = peft.get_peft_model(base_hf, peft.ShiraConfig(**hf_fields({**FIELDS, "init_weights": False}))).eval()
    torch.manual_seed(3)
    ours = pk.apply(base_ours, pk.SHiRA(**FIELDS, init_weights=False))
    theirs = hf_layers(hf)
    for path, layer in our_layers(ours).items():
        want = theirs[path].shira_weight["default"]
        assert layer.shira_weight["default"].dtype == want.dtype == torch.float32, path
        assert torch.equal(layer.shira_weight["default"], want), path
    with torch.no_grad():
        ids = batch("llama")["input_ids"]
        got = ours(input_ids=ids).logits
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), hf(input_ids=ids).logits.float(), atol=0.1)


def test_delta_is_the_values_at_the_mask_and_of_high_rank() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    model = nn.Sequential(base)
    pk.apply(model, pk.SHiRA(target_modules=["0"], rank=1, random_seed=5, init_weights=False))
    layer = model[0]
    assert isinstance(layer, SHiRALayer)
    mask = random_mask(10, 12, 1, 5)
    expected = torch.zeros(10, 12)
    for k, (i, j) in enumerate(mask.nonzero().tolist()):  # row-major order, one value per masked entry
        expected[i, j] = layer.shira_weight["default"][k]
    assert torch.equal(layer.delta_weight("default"), expected)
    x = torch.randn(3, 12)
    assert torch.allclose(layer(x), base(x) + x @ expected.T, atol=1e-6)
    assert torch.linalg.matrix_rank(expected) > 1  # 22 values, as many as a rank-1 LoRA, at more than rank 1


def test_gradients_equal_hf() -> None:
    hf, ours = hf_model(init_weights=False), ours_model(seed=9)  # another seed: the values come from the copy
    copy_values(hf, ours)
    inputs = batch("llama")
    hf.train()(**inputs).loss.backward()
    ours.train()(**inputs).loss.backward()
    theirs = hf_layers(hf)
    for path, layer in our_layers(ours).items():
        want = theirs[path].shira_weight["default"].grad
        assert want is not None and torch.allclose(layer.shira_weight["default"].grad, want, atol=1e-6), path
    assert all(p.grad is None for n, p in ours.named_parameters() if "shira_" not in n)


@pytest.mark.parametrize("fields", [
    {"random_seed": 7},
    {"mask_type": "banded", "mask_fn": banded_mask},
    {"target_modules": ["o_proj"], "modules_to_save": ["lm_head"]},
])
def test_files_load_both_ways_with_equal_logits(fields: dict[str, Any], tmp_path) -> None:
    hf = hf_model(init_weights=False, mask_fn=fields.get("mask_fn"), **{k: v for k, v in fields.items()
                                                                        if k != "mask_fn"})
    ours = ours_model(init_weights=False, **fields)
    copy_values(hf, ours)
    inputs = batch("llama")
    with torch.no_grad():
        if "modules_to_save" in fields:  # the trained head copy must travel with the file too
            head = hf.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
            ours.lm_head.copies["default"].weight.copy_(head)
        want = hf(**inputs).logits
        assert torch.allclose(ours(**inputs).logits, want, atol=1e-6)
    hf.save_pretrained(str(tmp_path / "hf"))
    pk.save_adapter(ours, tmp_path / "pk")

    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "pk"))
    assert sorted(mine) == sorted(theirs) and any(k.endswith(".shira_indices") for k in mine)
    for key, tensor in theirs.items():
        assert mine[key].dtype == tensor.dtype and torch.equal(mine[key], tensor), key
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hf_config.pop("peft_version")
    assert sorted(our_config.pop("target_modules")) == sorted(hf_config.pop("target_modules"))
    assert our_config == hf_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "pk")).eval()
    loaded = pk.load_adapter(build("llama"), tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, want, atol=1e-6)
        assert torch.allclose(back(**inputs).logits, want, atol=1e-6)
    for path, layer in our_layers(loaded).items():  # the file's indices, whatever mask the config would draw
        assert torch.equal(layer.shira_indices["default"], our_layers(ours)[path].shira_indices["default"])


def test_merge_unmerge_and_unload_equal_hf() -> None:
    hf, ours = hf_model(init_weights=False), ours_model()
    copy_values(hf, ours)
    assert_merges_as_hf(hf, ours, batch("llama"), SHiRALayer)


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    hf, ours = hf_model(init_weights=False), ours_model()
    other = {"rank": 1, "random_seed": 1, "target_modules": ["v_proj", "o_proj"], "init_weights": False}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.ShiraConfig(**hf_fields(other)))
    torch.manual_seed(4)
    pk.apply(ours, pk.SHiRA(**other), name="other")
    copy_values(hf, ours)
    copy_values(hf, ours, "other")
    check_two_adapters_as_hf(hf, ours)
    pk.delete_adapter(ours, "other")
    v_proj = ours.model.layers[0].self_attn.v_proj
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, SHiRALayer)
    assert isinstance(v_proj, SHiRALayer) and "default" in v_proj.shira_indices and "other" not in v_proj.shira_indices


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bases_take_the_sparse_update(bits: int) -> None:
    model = pk.quantize(build("llama"), bits=bits)
    pk.apply(model, pk.SHiRA(**FIELDS, init_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SHiRALayer)
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = layer.base_layer(x) + x @ layer.delta_weight("default").T
        assert torch.allclose(layer(x), want, atol=1e-5)
        weight = layer.kind.weight(layer.base_layer)
        merged = weight + layer.delta_weight("default")
        pk.merge(model)
        now = layer.kind.weight(layer.base_layer)  # re-quantized: W + ΔW up to its (coarse on 4 bits) step
        assert (now - merged).abs().max() < (weight - merged).abs().max() / 5
        pk.unmerge(model)
        assert (layer.kind.weight(layer.base_layer) - weight).abs().max() < (weight - merged).abs().max() / 5


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"rank=32 trains r·\(in \+ out\) = 2048 entries at "
                                          r"model.layers.0.self_attn.q_proj, more than its 32 × 32 = 1024 weight "
                                          r"entries; use rank <= 16"):
        pk.apply(build("llama"), pk.SHiRA(target_modules=["q_proj"]))
    model = build("llama")
    with pytest.raises(ConfigError, match="rank=32"):
        pk.apply(model, pk.SHiRA(target_modules=["o_proj", "q_proj"]))
    assert not any(isinstance(m, SHiRALayer) for m in model.modules())  # refused before anything changed
    with pytest.raises(ConfigError, match=r"= 5 entries at 0, more than its 4 × 1 = 4 weight entries; leave it out"):
        pk.apply(nn.Sequential(nn.Linear(1, 4)), pk.SHiRA(rank=1, target_modules=["0"]))
    with pytest.raises(ConfigError, match="rank=0 must be a positive integer"):
        pk.SHiRA(rank=0)
    with pytest.raises(ConfigError, match="mask_type='topk' needs mask_fn="):
        pk.SHiRA(mask_type="topk")
    with pytest.raises(ConfigError, match="mask_fn=3 must be a callable"):
        pk.SHiRA(mask_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="random_seed='1' must be an integer"):
        pk.SHiRA(random_seed="1")  # type: ignore[arg-type]
    model = build("llama")
    with pytest.raises(ConfigError, match=r"mask_fn's mask for model.layers.0.self_attn.q_proj has 192 ones; SHiRA "
                                          r"needs r·\(in \+ out\) = 128"):
        pk.apply(model, pk.SHiRA(**FIELDS, mask_fn=lambda layer, r: banded_mask(layer, r + 1)))
    assert not any(isinstance(m, SHiRALayer) for m in model.modules())
    with pytest.raises(ConfigError, match=r"must be a 32 × 32 tensor of 0s and 1s; got shape \(32, 32\) with "
                                          r"values \[-1.0, 1.0\]"):
        pk.apply(build("llama"), pk.SHiRA(**FIELDS, mask_fn=lambda layer, r: banded_mask(layer, r) * 2 - 1))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(build("llama"), pk.SHiRA(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="Conv1D"):  # HF PEFT refuses GPT-2's Conv1D too
        peft.get_peft_model(build("gpt2"), peft.ShiraConfig(r=1, target_modules=["c_attn"]))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="c_attn"):
        pk.apply(build("gpt2"), pk.SHiRA(rank=1, target_modules=["c_attn"]))
    with pytest.raises(UnsupportedLayerError, match="SHiRA cannot adapt a Conv1D"):
        SHiRALayer(build("gpt2").transformer.h[0].attn.c_attn)
    assert getattr(pk, str(PEFT_METHODS["shira"])) is pk.SHiRA


def test_a_mask_type_without_mask_fn_is_refused_where_hf_peft_fails_at_the_first_forward() -> None:
    """Deliberate difference (README): HF PEFT warns and builds layers without indices, which fail in forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(build("llama"), peft.ShiraConfig(r=2, target_modules=["q_proj"], mask_type="topk"))
    with pytest.raises(KeyError, match="default"):
        hf(**batch("llama"))
    with pytest.raises(ConfigError, match="mask_type='topk' needs mask_fn=<a callable mask_fn\\(base_layer, r\\)"):
        pk.SHiRA(rank=2, target_modules=["q_proj"], mask_type="topk")
