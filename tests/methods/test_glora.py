"""GLoRA against HF PEFT: initialisation in every form, forward, gradients, files both ways, merging, several adapters
and errors, on a tiny Llama (linear layers without bias) and OPT (with bias)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit as pk
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.glora import GLoRALayer
from peftkit.train.config import PEFT_METHODS

from models import (
    ARCHS,
    MORE_ARCHS,
    assert_files_match_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    check_two_adapters_as_hf,
    hf_pair,
    randomize_trainable,
    run,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "v_proj", "fc1"]}
FORMS = [  # (config_A_B, config_C, config_D_E): every form of every support at least once
    ("lora", "lora", "constant"),
    ("vector", "vector", "vector"),
    ("constant", "none", "none"),
    ("none", "lora", "vector"),
]


def pair(arch: str, seed: int = 1, **fields: Any) -> tuple[Any, Any]:
    fields = {"target_modules": TARGETS[arch], **fields}
    ours, hf = hf_pair(lambda: build(arch), pk.GLoRA(rank=2, **fields),
                       peft.GloraConfig(task_type="CAUSAL_LM", r=2, **fields), seed)
    return ours, hf


def copy_hf_tensors(hf: Any, ours: torch.nn.Module) -> None:
    """Random trainable tensors in ``hf``, copied into ``ours`` under the same names."""
    randomize_trainable(hf, scale=0.1, seed=5)
    got = trainable_tensors(ours)
    with torch.no_grad():
        for name, tensor in trainable_tensors(hf).items():
            got[name].copy_(tensor)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("forms", FORMS)
@pytest.mark.parametrize("init_weights", [True, False])
def test_initialisation_and_forward_equal_hf(arch: str, forms: tuple[str, str, str], init_weights: bool) -> None:
    fields: dict[str, Any] = dict(zip(("config_A_B", "config_C", "config_D_E"), forms, strict=True))
    ours, hf = pair(arch, init_weights=init_weights, **fields)
    assert_same_tensors_as_hf(ours, hf)  # the same draws in the same order, zero buffers included
    with torch.no_grad():
        result, expected = run(ours, arch), run(hf, arch)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
        if init_weights:  # the unchanged model
            torch.testing.assert_close(result, run(build(arch), arch), rtol=0, atol=1e-6)
        copy_hf_tensors(hf, ours)
        torch.testing.assert_close(run(ours, arch), run(hf, arch), rtol=1e-5, atol=1e-6)


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the supports are drawn, rounded to bf16 and trained in fp32 (zero buffers stay bf16)."""
    fields: dict[str, Any] = {"target_modules": TARGETS["opt"], "init_weights": False, "config_C": "none"}
    ours, hf = hf_pair(lambda: build("opt").to(torch.bfloat16), pk.GLoRA(rank=2, **fields),
                       peft.GloraConfig(task_type="CAUSAL_LM", r=2, **fields))
    assert_same_tensors_as_hf(ours, hf)
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "opt"), run(hf, "opt"), rtol=0.02, atol=0.02)


def test_update_is_the_generalized_weight_and_bias() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = GLoRALayer(base)
    layer.add("default", pk.GLoRA(rank=3, config_D_E="vector", init_weights=False))
    layer.set_active(["default"])
    parts = {k: getattr(layer, k)["default"] for k in layer.adapter_containers}
    a, b = parts["glora_A"].Xd @ parts["glora_A"].Xu, parts["glora_B"].Xd @ parts["glora_B"].Xu
    c = parts["glora_C"].Xd @ parts["glora_C"].Xu
    w, bias = base.weight, base.bias
    x = torch.randn(4, 6)
    expected = x @ (w + w * a + b).T + bias + bias * parts["glora_D"].X + parts["glora_E"].X + (w @ c).squeeze(-1)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(("arch", "forms"), [("llama", FORMS[0]), ("opt", FORMS[0]), ("opt", FORMS[1]),
                                             ("opt", FORMS[3])])
def test_gradients_equal_hf(arch: str, forms: tuple[str, str, str]) -> None:
    fields: dict[str, Any] = dict(zip(("config_A_B", "config_C", "config_D_E"), forms, strict=True))
    ours, hf = pair(arch, init_weights=False, **fields)
    assert_same_grads_as_hf(ours, hf, lambda m: run(m, arch), atol=1e-5)  # fp32 rounding of a different order


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {}),
    ("opt", {"config_A_B": "vector", "config_D_E": "vector", "bias": "glora_only"}),
    ("opt", {"config_A_B": "none", "config_C": "vector", "bias": "all"}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    ours, hf = pair(arch, **fields)
    copy_hf_tensors(hf, ours)  # trained biases too: they must travel with the file
    # target_modules: HF PEFT writes the set it was given, peftkit the leaf names; the tensor keys show both match.
    inputs = (ARCHS[arch] if arch in ARCHS else MORE_ARCHS[arch]).inputs()
    assert_files_match_hf(hf, ours, arch, inputs, tmp_path, loose=("target_modules",))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_merge_unmerge_and_unload_equal_hf(arch: str) -> None:
    ours, hf = pair(arch, config_D_E="vector")
    copy_hf_tensors(hf, ours)
    weights = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        want = run(ours, arch)
        pk.merge(ours)
        torch.testing.assert_close(run(ours, arch), want, rtol=1e-5, atol=1e-5)
        pk.unmerge(ours)
        for n, p in ours.named_parameters():
            assert torch.equal(p, weights[n]), n  # the original weight and bias, exactly
        plain = pk.unload(ours, merge=True)
        theirs = dict(hf.merge_and_unload().named_parameters())
        for n, p in plain.named_parameters():
            torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6)
        assert not any(isinstance(m, GLoRALayer) for m in plain.modules())


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    ours, hf = pair("opt")
    other: dict[str, Any] = {"config_A_B": "vector", "config_D_E": "vector", "target_modules": ["v_proj", "k_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.GloraConfig(task_type="CAUSAL_LM", r=3, **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.GLoRA(rank=3, **other), name="other")
    hf.base_model.set_adapter(["default", "other"])
    pk.set_adapter(ours, ["default", "other"])
    copy_hf_tensors(hf, ours)
    check_two_adapters_as_hf(hf, ours, "opt")
    attention = ours.model.decoder.layers[0].self_attn
    pk.merge(ours)  # both: the second adapter's change is computed from the original weight too
    pk.delete_adapter(ours, "default")  # unmerges "default" alone
    hf.base_model.set_adapter(["other"])
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "opt"), run(hf, "opt"), rtol=1e-5, atol=1e-5)
    pk.unmerge(ours)
    assert not isinstance(attention.q_proj, GLoRALayer)
    assert isinstance(attention.v_proj, GLoRALayer) and attention.v_proj.adapter_names == ["other"]
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "opt"), run(hf, "opt"), rtol=1e-5, atol=1e-6)


def test_unmerge_restores_the_weight_where_hf_peft_divides_by_zero() -> None:
    """Deliberate difference: HF PEFT recovers W₀ as (W − ΣB) / (1 + ΣA), which fails where 1 + ΣA is 0 (A = −1
    switches a weight off); peftkit keeps W₀ while merged and restores it exactly."""
    ours, hf = pair("llama", config_A_B="constant")
    for model in (ours, hf):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "glora_A" in name:
                    p.fill_(-1.0)
    base: Any = build("llama")
    original = base.model.layers[0].self_attn.q_proj.weight
    pk.merge(ours)
    pk.unmerge(ours)
    assert torch.equal(ours.model.layers[0].self_attn.q_proj.base_layer.weight, original)
    hf.merge_adapter()
    hf.unmerge_adapter()
    assert not torch.isfinite(hf.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).all()


def test_errors() -> None:
    for field, value in [("config_A_B", "full"), ("config_C", "constant"), ("config_D_E", "lora"),
                         ("bias", "lora_only")]:
        with pytest.raises(ConfigError, match=f"{field}={value!r} must be one of"):
            pk.GLoRA(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank=0 must be a positive integer"):
        pk.GLoRA(rank=0)
    with pytest.raises(ConfigError, match="init_weights='yes' must be True or False"):
        pk.GLoRA(init_weights="yes")  # type: ignore[arg-type]
    model = build("gpt2")
    with pytest.raises(UnsupportedLayerError, match="Conv1D"):  # HF PEFT refuses GPT-2's Conv1D as well
        pk.apply(model, pk.GLoRA(target_modules=["c_attn"]))
    assert not any(isinstance(m, GLoRALayer) for m in model.modules())  # refused before anything changed
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        peft.get_peft_model(build("gpt2"), peft.GloraConfig(target_modules=["c_attn"]))
    with pytest.raises(UnsupportedLayerError, match="embed_tokens"):
        pk.apply(build("llama"), pk.GLoRA(target_modules=["embed_tokens"]))
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        GLoRALayer(torch.nn.Conv2d(2, 2, 1))
    assert getattr(pk, str(PEFT_METHODS["glora"])) is pk.GLoRA
