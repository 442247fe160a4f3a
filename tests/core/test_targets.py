"""Target syntax: leaf names, globs, aliases, exclusions, layer indices, and the errors for bad targets."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.matching import layer_index, matches
from peftkit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError

from models import build


def adapted_names(model: nn.Module) -> list[str]:
    from peftkit.core.state import get_state

    return get_state(model).targets["default"]


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("model.layers.0.self_attn.q_proj", "q_proj", True),
        ("q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "*.layers.0.*.q_proj", True),
        ("model.layers.1.self_attn.q_proj", "*.layers.0.*.q_proj", False),
        ("model.layers.0.self_attn.qq_proj", "q_proj", False),
        ("model.layers.0.self_attn.q_proj", "proj", False),
    ],
)
def test_pattern_semantics(name: str, pattern: str, expected: bool) -> None:
    assert matches(name, pattern) is expected


def test_layer_index_takes_the_outer_block() -> None:
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.1.attn.c_attn") == 1
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q") == 1  # T5: block, not sub-layer
    assert layer_index("lm_head") is None


def test_leaf_glob_exclude_and_layers() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["*.layers.0.*.q_proj", "v_proj"], exclude_modules=["*.1.*.v_proj"]))
    assert adapted_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "o_proj"], layers=[1]))
    assert adapted_names(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("arch,head", [("llama", "lm_head"), ("bert", "classifier"), ("gpt2", "lm_head")])
def test_all_linear_skips_output_and_classifier_heads(arch: str, head: str) -> None:
    model = build(arch)
    pk.apply(model, pk.LoRA(target_modules="all-linear"))
    names = adapted_names(model)
    assert names and head not in names
    from peftkit.core.registry import linear_kind

    every_linear = [n for n, m in build(arch).named_modules() if linear_kind(m) is not None]
    assert set(every_linear) - set(names) == {n for n in every_linear if n.split(".")[0] in ("lm_head", "classifier")}


def test_all_linear_on_an_adapted_model_finds_the_same_layers() -> None:
    """A second adapter with ``all-linear`` goes on the layers the first one wrapped (they stand for the linear
    layers inside them), not an error that nothing matches."""
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules="all-linear"))
    pk.apply(model, pk.LoRA(target_modules="all-linear", rank=2), name="second")
    from peftkit.core.state import get_state

    assert get_state(model).targets["second"] == adapted_names(model)
    assert model.model.layers[0].self_attn.q_proj.lora_A["second"].weight.shape[0] == 2


def test_no_match_names_the_pattern_and_near_misses() -> None:
    model = build("llama")
    with pytest.raises(TargetNotFoundError, match=r"'q_prj'.*q_proj"):
        pk.apply(model, pk.LoRA(target_modules=["q_prj"]))
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_unsupported_type_names_type_and_supported_ones() -> None:
    model = build("llama")
    with pytest.raises(UnsupportedLayerError, match=r"LlamaRMSNorm.*supported layer types: .*Linear") as info:
        pk.apply(model, pk.LoRA(target_modules=["input_layernorm"]))
    assert "layers inside" not in str(info.value)  # a norm has none to suggest
    with pytest.raises(UnsupportedLayerError, match=r"LlamaAttention.*Target the layers inside them .*self_attn\.\*"):
        pk.apply(model, pk.LoRA(target_modules=["self_attn"]))


def test_near_misses_never_offer_container_indices() -> None:
    model = build("llama")
    with pytest.raises(TargetNotFoundError) as info:
        pk.apply(model, pk.LoRA(target_modules=["rank=4"]))
    assert not re.search(r"'\d+'", str(info.value))


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_rank_or_alpha_pattern_matching_no_module_is_an_error(field: str) -> None:
    model = build("llama")
    with pytest.raises(ConfigError, match=rf"{field} key 'v_prj' matches no module.*v_proj"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], **{field: {"v_prj": 2}}))
    assert all(p.requires_grad for p in model.parameters())  # untouched
    # A key for modules that are not targets is allowed (HF PEFT ignores it too).
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=4, **{field: {"v_proj": 2}}))


def test_layers_filter_that_leaves_nothing_is_an_error() -> None:
    with pytest.raises(TargetNotFoundError, match="layers=\\[7\\]"):
        pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], layers=[7]))


def test_targets_and_modules_to_save_must_not_overlap() -> None:
    with pytest.raises(ConfigError, match="both adapter targets and modules_to_save"):
        pk.apply(build("bert"), pk.LoRA(target_modules=["query", "pooler.dense"], modules_to_save=["pooler.dense"]))
    model = build("bert")
    with pytest.raises(ConfigError, match=r"\['bert.pooler.dense'\] are both adapter targets and modules_to_save"):
        pk.apply(model, pk.LoRA(target_modules=["query", "pooler.dense"], modules_to_save=["pooler"]))
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_inspect_is_a_dry_run_with_counts() -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = pk.inspect(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4))
    assert [r.name for r in report.rows] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    # q_proj: 32 → 32, v_proj: 32 → 16 (grouped-query attention with 2 KV heads of 8)
    assert [r.added_params for r in report.rows] == [4 * 32 + 32 * 4, 4 * 32 + 16 * 4] * 2
    assert "4 modules adapted" in str(report)
    assert pk.list_adapters(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_inspect_counts_the_copies_of_modules_to_save() -> None:
    config = pk.LoRA(target_modules=["query", "value"], rank=4, modules_to_save=["classifier"])
    report = pk.inspect(build("bert"), config)
    assert report.rows[-1].name == "classifier" and report.rows[-1].layer_type == "Linear (copy)"
    model = pk.apply(build("bert"), config)
    assert report.added_params == pk.count_parameters(model)[0]


def test_inspect_lists_role_names_and_counts_a_shared_factor_once() -> None:
    model = build("llama")
    report = pk.inspect(model, pk.LoRA(target_modules=["linear_qkv"], rank=4))
    assert [r.roles for r in report.rows[:3]] == [("linear_qkv", "linear_q"), ("linear_qkv", "linear_k"),
                                                 ("linear_qkv", "linear_v")]
    assert "linear_qkv, linear_q" in str(report)
    # one shared A (4×32) for q, k and v, then B rows for each: q 32, k 16, v 16 outputs
    assert report.added_params == 2 * (4 * 32 + 4 * (32 + 16 + 16))
    applied = build("llama")
    pk.apply(applied, pk.LoRA(target_modules=["linear_qkv"], rank=4))
    assert pk.count_parameters(applied)[0] == report.added_params


def test_inspect_counts_lora_trainable_token_rows() -> None:
    config = pk.LoRA(target_modules=["q_proj"], rank=4, trainable_token_indices=[5, 6])
    report = pk.inspect(build("llama"), config)
    model = pk.apply(build("llama"), config)
    assert report.added_params == pk.count_parameters(model)[0]
    assert report.rows[-1].name == "model.embed_tokens"


def test_a_pattern_with_commas_that_matches_nothing_says_to_write_a_list() -> None:
    model = build("llama")
    with pytest.raises(TargetNotFoundError) as info:
        pk.apply(model, pk.LoRA(target_modules="q_proj, v_proj"))
    assert str(info.value).endswith(
        " A pattern is one name, commas included: to target several, write a list, e.g. "
        "peft.target_modules=[q_proj,v_proj] on the command line or target_modules=['q_proj', 'v_proj'] in Python.")
    with pytest.raises(TargetNotFoundError) as info:
        pk.apply(model, pk.LoRA(target_modules=["q_prj"]))
    assert "write a list" not in str(info.value)
