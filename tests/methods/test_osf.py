"""OSF against HF PEFT: SVD split, initialisation, forward, projected gradients, files both ways, merging, several
adapters and errors, on a tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.osf import OSFLayer, resolve_rank
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_cross_load,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    build,
    randomize_trainable,
    trainable_tensors,
)

peft = pytest.importorskip("peft")


def hf_model(seed: int = 3, **fields: Any) -> Any:
    base = build("llama")
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.OSFConfig(task_type="CAUSAL_LM", **fields)).eval()


def ours_model(seed: int = 3, **fields: Any) -> Any:
    base = build("llama")
    torch.manual_seed(seed)
    return pk.apply(base, pk.OSF(**fields))


def osf_layers(model: torch.nn.Module) -> dict[str, OSFLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OSFLayer)}


def test_ranks_resolve_as_in_hf() -> None:
    assert [resolve_rank(v, 16) for v in (None, 4, 0.75, 1.0, 40, 0.01)] == [8, 4, 12, 16, 16, 0]


@pytest.mark.parametrize("fields", [
    {},  # HF PEFT's Llama targets, half of each smaller side frozen
    {"effective_rank": 4, "rank_pattern": {"v_proj": 0.75, "down_proj": 30}},
    {"effective_rank": 0.25, "init_weights": False, "target_modules": ["q_proj", "k_proj", "up_proj"]},
])
def test_initialisation_and_forward_equal_hf(fields: dict[str, Any]) -> None:
    hf, ours = hf_model(**fields), ours_model(**fields)
    want, got = trainable_tensors(hf), trainable_tensors(ours)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # the same SVD, or the same draws from the global generator in the same order
        assert torch.equal(got[name], tensor), name
    inputs = batch("llama")
    with torch.no_grad():
        expected, result = hf(**inputs), ours(**inputs)
        torch.testing.assert_close(result.logits, expected.logits, rtol=0, atol=1e-6)
        if fields.get("init_weights", True):  # the factors are the weight's own: the model is unchanged
            torch.testing.assert_close(result.logits, build("llama")(**inputs).logits, rtol=0, atol=1e-5)
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def test_the_split_reconstructs_the_weight_and_only_the_trained_factors_are_saved() -> None:
    base = torch.nn.Linear(12, 20)  # out > in: U_h kept, V's projector from V_l
    layer = OSFLayer(base)
    layer.add("default", 5, True, "layer")
    params: Any = layer.osf_svd_params["default"]
    assert params["U_low"].shape == (20, 7) and params["S_low"].shape == (7,) and params["V_low"].shape == (7, 12)
    assert "default" in layer.frozen("_osf_U_high") and "default" not in layer.frozen("_osf_V_high")
    high = layer.frozen("_osf_U_high")["default"]
    low = (params["U_low"] * params["S_low"]) @ params["V_low"]
    assert torch.linalg.matrix_rank(base.weight.detach() - low) == 5
    assert torch.allclose(high.T @ params["U_low"], torch.zeros(5, 7), atol=1e-5)  # orthogonal subspaces
    assert sorted(layer.adapter_state_dict("default")) == ["osf_svd_params.S_low", "osf_svd_params.U_low",
                                                           "osf_svd_params.V_low"]
    assert {k.split(".")[0] for k in layer.state_dict()} == {"base_layer", "osf_svd_params", "_osf_U_low_init",
                                                             "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high"}


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
def test_gradients_are_projected_off_the_frozen_subspace(shape: tuple[int, int]) -> None:
    layer = OSFLayer(torch.nn.Linear(shape[1], shape[0]).requires_grad_(False))
    layer.add("default", 4, False, "layer")
    layer.set_active(["default"])
    loss: Any = torch.sum(layer(torch.randn(3, shape[1])) ** 2)
    loss.backward()
    params: Any = layer.osf_svd_params["default"]
    weight = layer.weight.detach()
    u, _, vt = torch.linalg.svd(weight, full_matrices=False)
    grad_u, grad_v = params["U_low"].grad, params["V_low"].grad
    assert (u[:, :4].T @ grad_u).abs().max() < 1e-6 * grad_u.abs().max() * grad_u.numel()
    assert (grad_v @ vt[:4].T).abs().max() < 1e-6 * grad_v.abs().max() * grad_v.numel()
    assert params["S_low"].grad is not None and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("init_weights", [True, False])
def test_gradients_equal_hf(init_weights: bool) -> None:
    fields: dict[str, Any] = {"effective_rank": 0.5, "rank_pattern": {"gate_proj": 3}, "init_weights": init_weights}
    hf, ours = hf_model(**fields), ours_model(**fields)
    assert_gradients_match_hf(hf, ours, batch("llama"), "osf_")


def test_files_load_both_ways_with_equal_logits(tmp_path: Path) -> None:
    fields: dict[str, Any] = {"effective_rank": 6, "rank_pattern": {"v_proj": 0.5},
                              "target_modules": ["q_proj", "v_proj", "down_proj"]}
    hf, ours = hf_model(**fields), ours_model(**fields)
    inputs = batch("llama")
    with torch.no_grad():  # trained values: the file must carry them, the frozen parts come from the base again
        for p in trainable_tensors(hf).values():
            p.add_(0.05)
        for p in trainable_tensors(ours).values():
            p.add_(0.05)
        want = hf(**inputs).logits
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=1e-6)
    hf_config, our_config = assert_files_cross_load(hf, ours, "llama", inputs, want, tmp_path)
    # HF PEFT's regex as given; peftkit's anchors each module it changes (the same modules, as the logits show).
    assert set(our_config.pop("rank_pattern")) == {rf"^model\.layers\.{i}\.self_attn\.v_proj$" for i in range(2)}
    hf_config.pop("rank_pattern")
    for config in (hf_config, our_config):
        config["target_modules"] = sorted(config["target_modules"])
    assert our_config == hf_config
    loaded = pk.load_adapter(build("llama"), tmp_path / "hf")
    assert {n: layer.effective_rank["default"] for n, layer in osf_layers(loaded).items() if ".0." in n} == {
        "model.layers.0.self_attn.q_proj": 6, "model.layers.0.self_attn.v_proj": 8, "model.layers.0.mlp.down_proj": 6}


def test_merge_unmerge_and_unload() -> None:
    hf, ours = hf_model(effective_rank=4), ours_model(effective_rank=4)
    randomize_trainable(hf, scale=0.05, seed=1, shift=True)
    randomize_trainable(ours, scale=0.05, seed=1, shift=True)
    assert_merges_as_hf(hf, ours, batch("llama"), OSFLayer)


def test_unmerge_restores_the_weight_where_hf_peft_cannot() -> None:
    """HF PEFT 0.21.2 refuses to unmerge OSF (its merge keeps no way back); W − ΔW is exact enough to offer."""
    hf: Any = randomize_trainable(hf_model(effective_rank=4), scale=0.05, seed=1, shift=True)
    hf.merge_adapter()
    with pytest.raises(NotImplementedError):
        hf.unmerge_adapter()
    ours: Any = randomize_trainable(ours_model(effective_rank=4), scale=0.05, seed=1, shift=True)
    weight = ours.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    pk.merge(ours)
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
    pk.unmerge(ours)
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_several_adapters_disable_and_delete() -> None:
    hf, ours = hf_model(effective_rank=4), ours_model(effective_rank=4)
    other: dict[str, Any] = {"effective_rank": 0.75, "target_modules": ["v_proj", "o_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.OSFConfig(task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.OSF(**other), name="other")
    randomize_trainable(hf, scale=0.05, seed=2, shift=True)
    with torch.no_grad():  # the same tensors in both, then each adapter alone as in HF PEFT
        for p in ours.parameters():
            p.requires_grad_(True)
        for name, p in ours.named_parameters():
            if "osf_" in name:
                p.copy_(dict(hf.named_parameters())[f"base_model.model.{name}"])
    inputs = batch("llama")
    with torch.no_grad():
        for name in ("default", "other"):
            hf.base_model.set_adapter(name)
            pk.set_adapter(ours, name)
            torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, build("llama")(**inputs).logits)
    pk.delete_adapter(ours, "other")
    assert pk.list_adapters(ours) == ["default"]
    assert not osf_layers(ours)["model.layers.0.self_attn.v_proj"].frozen("_osf_U_low_init")._buffers.get("other")
    assert osf_layers(ours)["model.layers.0.self_attn.o_proj"].adapter_names == ["default"]


def test_both_adapters_active_add_up_where_hf_peft_applies_only_the_first() -> None:
    """HF PEFT 0.21.2's forward applies only the first active OSF adapter, though its merge folds in all of them;
    peftkit sums every active adapter, so the output matches the merged weight."""
    hf, ours = hf_model(effective_rank=4), ours_model(effective_rank=4)
    torch.manual_seed(4)
    hf.add_adapter("other", peft.OSFConfig(task_type="CAUSAL_LM", effective_rank=2))
    torch.manual_seed(4)
    pk.apply(ours, pk.OSF(effective_rank=2), name="other")
    randomize_trainable(ours, scale=0.05, seed=2, shift=True)
    pk.set_adapter(ours, ["default", "other"])
    randomize_trainable(ours, scale=0.05, seed=3, shift=True)  # both adapters trained
    inputs = batch("llama")
    with torch.no_grad():
        both = ours(**inputs).logits
        pk.set_adapter(ours, ["default"])
        first = ours(**inputs).logits
        assert not torch.allclose(both, first, atol=1e-4)
        pk.set_adapter(ours, ["default", "other"])
        pk.merge(ours)
        torch.testing.assert_close(ours(**inputs).logits, both, rtol=0, atol=1e-5)
    hf.base_model.set_adapter(["default", "other"])
    with torch.no_grad():  # HF PEFT, the same two adapters active: the first one's output alone
        for name, p in hf.named_parameters():
            if "osf_" in name:
                p.copy_(dict(ours.named_parameters())[name.removeprefix("base_model.model.")])
        pk.unmerge(ours)
        pk.set_adapter(ours, ["default"])
        torch.testing.assert_close(hf(**inputs).logits, ours(**inputs).logits, rtol=0, atol=1e-6)


def test_errors() -> None:
    for bad in ({"effective_rank": 0}, {"effective_rank": -2}, {"effective_rank": 1.5}, {"effective_rank": "4"},
                {"rank_pattern": {"v_proj": 0.0}}, {"init_weights": None}):
        with pytest.raises(ConfigError, match="effective_rank=|rank_pattern|init_weights="):
            pk.OSF(**bad)
    model: Any = build("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ConfigError, match="resolves to 0 frozen directions at model.layers.0.self_attn.k_proj"):
        pk.apply(model, pk.OSF(effective_rank=0.04, target_modules=["q_proj", "k_proj"]))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)  # checked before any change
    with pytest.raises(ConfigError, match="rank_pattern key 'v_prj'"):
        pk.apply(build("llama"), pk.OSF(rank_pattern={"v_prj": 3}))
    # HF PEFT skips these silently (GPT-2's defaults are Conv1D layers, which it leaves unadapted): peftkit refuses.
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(build("llama"), pk.OSF(target_modules=["embed_tokens"]))
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="Conv1D|c_attn"):
        pk.apply(build("gpt2"), pk.OSF())
    skipped = peft.get_peft_model(build("gpt2"), peft.OSFConfig(task_type="CAUSAL_LM"))
    assert skipped.get_nb_trainable_parameters()[0] == 0  # HF PEFT: nothing adapted, no error
    with pytest.raises(UnsupportedLayerError, match="OSF cannot adapt a Embedding"):
        OSFLayer(torch.nn.Embedding(4, 4))
    assert getattr(pk, str(PEFT_METHODS["osf"])) is pk.OSF


@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])  # HF PEFT's table; Phi-3 is not in it: all linear but the head
def test_default_targets_are_hf_peft_s(arch: str) -> None:
    model = build(arch)
    pk.apply(model, pk.OSF(effective_rank=2))
    hf = peft.get_peft_model(build(arch), peft.OSFConfig(effective_rank=2, task_type="CAUSAL_LM"))
    assert sorted(osf_layers(model)) == sorted(n.removeprefix("base_model.model.") for n, m in hf.named_modules()
                                               if type(m).__name__ == "Linear" and hasattr(m, "osf_svd_params"))


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the split is computed in fp32, rounded to bf16, and the trained factors kept in fp32 (the
    frozen ones in bf16), as HF PEFT does."""
    base_hf, base_ours = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    hf = peft.get_peft_model(base_hf, peft.OSFConfig(effective_rank=4)).eval()
    ours = pk.apply(base_ours, pk.OSF(effective_rank=4))
    got = trainable_tensors(ours)
    for name, tensor in trainable_tensors(hf).items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    with torch.no_grad():
        ids = batch("llama")["input_ids"]
        assert torch.equal(ours(input_ids=ids).logits, hf(input_ids=ids).logits)
