"""Lily against HF PEFT: initialisation and sharing of A and B across layers, forward, gradients, files both ways,
several adapters, merging refused and errors, on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.lily import LilyLayer
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_match_hf,
    assert_gradients_match_hf,
    assert_same_tensors_as_hf,
    build,
    randomize_trainable,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

FIELDS: dict[str, object] = {"r": 4, "num_B": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def pair(**fields: object) -> tuple[Any, Any]:
    """HF PEFT's and peftkit's Lily on a tiny Llama from the same seed (``r`` spelled ``rank`` for peftkit)."""
    merged = {**FIELDS, **fields}
    hf_base, our_base = build("llama"), build("llama")
    torch.manual_seed(3)
    hf = peft.get_peft_model(hf_base, peft.LilyConfig(task_type="CAUSAL_LM", **merged)).eval()
    ours_fields = {("rank" if k == "r" else k): v for k, v in merged.items()}
    torch.manual_seed(3)
    return hf, pk.apply(our_base, pk.Lily(**ours_fields))  # type: ignore[arg-type]


def sharing(model: Any, name: str = "default") -> list[tuple[int, int]]:
    """For each Lily layer in module order, the index of the first layer holding the same A and the same B."""
    layers: list[Any] = [m for m in model.modules() if hasattr(m, "lily_A") and name in m.lily_A]
    a_s = [layer.lily_A[name] for layer in layers]
    b_s = [layer.lily_B[name] for layer in layers]
    return [(next(j for j, a in enumerate(a_s) if a is a_s[i]), next(j for j, b in enumerate(b_s) if b is b_s[i]))
            for i in range(len(layers))]


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("stride_A", [1, 2])
def test_initialisation_sharing_and_forward_equal_hf(init_weights: bool, stride_A: int) -> None:
    hf, ours = pair(init_weights=init_weights, stride_A=stride_A)
    assert_same_tensors_as_hf(ours, hf)  # the same draws, in the same order; the same parameter counts
    assert sharing(ours) == sharing(hf)
    if stride_A == 2:  # the two q_proj layers share their A: the group's first layer's
        assert ours.model.layers[1].self_attn.q_proj.lily_A["default"] is ours.model.layers[0].self_attn.q_proj.lily_A[
            "default"]
    inputs = batch("llama")
    with torch.no_grad():
        base, expected, result = build("llama")(**inputs).logits, hf(**inputs), ours(**inputs)
    assert torch.allclose(result.logits, expected.logits, atol=1e-6)
    assert torch.equal(result.logits, base) is init_weights  # zero B's leave the model as it was


def test_update_is_the_router_mixture_of_the_shared_bs() -> None:
    layer = LilyLayer(torch.nn.Linear(6, 5))
    layer.add("default", rank=3, num_b=2, scaling=0.7, init_weights=False)
    layer.set_active(["default"])
    x = torch.randn(2, 4, 6)
    a, b, r = (cast(torch.Tensor, m["default"].weight) for m in (layer.lily_A, layer.lily_B, layer.lily_router))
    hidden = x @ a.T
    p = torch.softmax(hidden @ r.T, dim=-1).reshape(-1, 2).mean(0)  # one mixture for the whole batch
    mixed = p[0] * b[:3] + p[1] * b[3:]
    assert torch.allclose(layer(x), layer.base_layer(x) + 0.7 * hidden @ mixed, atol=1e-6)


def test_gradients_equal_hf() -> None:
    hf, ours = pair(init_weights=False, stride_A=2)
    for model in (hf, ours):
        randomize_trainable(model, scale=0.2, seed=5)  # the same values: both list the parameters in the same order
    assert_gradients_match_hf(hf, ours, batch("llama"), "lily_")


@pytest.mark.parametrize("fields", [{"stride_A": 2, "scaling": 0.5}, {"target_modules": ["q_proj", "k_proj"]}])
def test_files_load_both_ways_with_equal_logits(fields: dict[str, object], tmp_path: Path) -> None:
    hf, ours = pair(**fields)
    with torch.no_grad():
        for model in (hf, ours):  # shared tensors are shifted once, in both
            for p in trainable_tensors(model).values():
                p.add_(0.1)
    assert_files_match_hf(hf, ours, "llama", batch("llama"), tmp_path, loose=("target_modules",))
    written = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "pk")]
    assert set(written[0]["target_modules"]) == set(written[1]["target_modules"])  # HF PEFT writes a set's order
    loaded = pk.load_adapter(build("llama"), tmp_path / "hf", trainable=True)
    assert sharing(loaded) == sharing(hf)  # the layers share as they did in HF PEFT


def test_hf_regex_targets_group_every_layer_of_one_shape(tmp_path: Path) -> None:
    """HF PEFT shares over all layers a regex string selects (same shape): so does an adapter loaded from its file."""
    hf_base = build("llama")
    torch.manual_seed(3)
    hf = peft.get_peft_model(hf_base, peft.LilyConfig(r=4, target_modules=r".*\.(q_proj|o_proj)", stride_A=2))
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("llama"), tmp_path, trainable=True)
    assert sharing(loaded) == sharing(hf) == [(0, 0), (0, 0), (2, 0), (2, 0)]
    pk.save_adapter(loaded, tmp_path / "again")
    again = pk.load_adapter(build("llama"), tmp_path / "again")
    assert sharing(again) == sharing(hf)


def test_several_adapters_disable_and_delete() -> None:
    hf, ours = pair(init_weights=False)
    other = {"r": 2, "num_B": 2, "target_modules": ["v_proj", "o_proj"], "init_weights": False}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.LilyConfig(task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.Lily(**{("rank" if k == "r" else k): v for k, v in other.items()}),  # type: ignore[arg-type]
             name="other")
    # HF PEFT 0.21.2 shares A and B for the first adapter only (its post-injection hook runs in the model's
    # constructor, not in add_adapter); peftkit shares them for every adapter, which HF PEFT's hook gives here.
    assert sharing(hf, "other") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    hf.base_model._post_injection_hook(hf.base_model.model, hf.peft_config["other"], "other")
    assert sharing(ours, "other") == sharing(hf, "other") == [(0, 0), (1, 1), (2, 0), (3, 1)]
    inputs = batch("llama")
    with torch.no_grad():
        for names in (["other"], ["default", "other"]):
            hf.base_model.set_adapter(names)
            pk.set_adapter(ours, names)
            assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, build("llama")(**inputs).logits)
    pk.delete_adapter(ours, "other")
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, LilyLayer)
    assert isinstance(ours.model.layers[0].self_attn.v_proj, LilyLayer)


def test_merge_is_refused_as_in_hf() -> None:
    hf, ours = pair(init_weights=False)
    with pytest.raises(NotImplementedError):
        hf.merge_and_unload()
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(MergeError, match="cannot be merged: the router mixes"):
        pk.merge(ours)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    plain = pk.unload(ours, merge=False)
    assert not any(isinstance(m, LilyLayer) for m in plain.modules())


def test_errors() -> None:
    with pytest.raises(ConfigError, match="num_B=1 must be an integer >= 2: the router needs"):
        pk.Lily(num_B=1)
    with pytest.raises(ConfigError, match="stride_A=0 must be an integer >= 1"):
        pk.Lily(stride_A=0)
    with pytest.raises(ConfigError, match="rank=0 must be an integer >= 1"):
        pk.Lily(rank=0)
    with pytest.raises(ConfigError, match="scaling=nan must be a finite number"):
        pk.Lily(scaling=float("nan"))
    with pytest.raises(ConfigError, match="init_weights=1 must be True or False"):
        pk.Lily(init_weights=1)  # type: ignore[arg-type]
    model = build("llama")
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(model, pk.Lily(target_modules=["embed_tokens"]))
    assert not any(isinstance(m, LilyLayer) for m in model.modules())  # validated before the model changed
    with pytest.raises(NotImplementedError, match="Conv1D"):  # HF PEFT refuses GPT-2's Conv1D too
        peft.get_peft_model(build("gpt2"), peft.LilyConfig(target_modules=["c_attn"]))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="c_attn"):
        pk.apply(build("gpt2"), pk.Lily(target_modules=["c_attn"]))
    with pytest.raises(UnsupportedLayerError, match="Lily cannot adapt a Embedding"):
        LilyLayer(torch.nn.Embedding(4, 4))
    assert getattr(pk, str(PEFT_METHODS["lily"])) is pk.Lily


def test_default_targets_are_hf_peft_s() -> None:
    hf_base = build("llama")
    torch.manual_seed(3)
    hf = peft.get_peft_model(hf_base, peft.LilyConfig(r=4))
    ours = pk.apply(build("llama"), pk.Lily(rank=4))
    assert sorted(trainable_tensors(ours)) == sorted(trainable_tensors(hf))
