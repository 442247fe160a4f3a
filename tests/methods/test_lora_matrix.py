"""One table-driven matrix: architecture × LoRA variant × operation.

Architectures cover every base-layer kind: Linear (Llama with grouped-query attention, BERT, T5),
GPT-2's Conv1D, Embedding, Conv1d and Conv2d (ConvNet). Variants: plain, rsLoRA, rank/alpha patterns.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.methods.lora_layers import LoRALayer

from models import ARCHS, build, randomize_adapters, run

VARIANTS = {
    "plain": lambda arch: pk.LoRA(target_modules=ARCHS[arch].targets, rank=4, alpha=8,
                                  modules_to_save=ARCHS[arch].modules_to_save),
    "rslora": lambda arch: pk.LoRA(target_modules=ARCHS[arch].targets, rank=4, alpha=8, use_rslora=True,
                                   modules_to_save=ARCHS[arch].modules_to_save),
    "patterns": lambda arch: pk.LoRA(target_modules=ARCHS[arch].targets, rank=4, alpha=8,
                                     rank_pattern={ARCHS[arch].targets[0]: 2},
                                     alpha_pattern={ARCHS[arch].targets[-1]: 3},
                                     modules_to_save=ARCHS[arch].modules_to_save),
}
CASES = [(a, v) for a in ARCHS for v in VARIANTS]


def adapted(arch: str, variant: str, name: str = "default", seed: int = 0) -> torch.nn.Module:
    model = build(arch)
    pk.apply(model, VARIANTS[variant](arch), name=name)
    randomize_adapters(model, seed)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("arch,variant", CASES)
def test_fresh_adapter_changes_nothing_and_disable_is_exact(arch: str, variant: str) -> None:
    model = build(arch)
    with torch.no_grad():
        base = run(model, arch)
        pk.apply(model, VARIANTS[variant](arch))
        # Embedding LoRA starts with A = 0, everything else with B = 0: the output is unchanged.
        assert torch.allclose(run(model, arch), base, atol=1e-6)
        randomize_adapters(model)
        assert not torch.allclose(run(model, arch), base, atol=1e-4)
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)


@pytest.mark.parametrize("arch,variant", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(arch: str, variant: str) -> None:
    model = adapted(arch, variant)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        unmerged = run(model, arch)
        pk.merge(model, safe=True)
        assert rel_err(run(model, arch), unmerged) <= 1e-5
        pk.unmerge(model)
        assert rel_err(run(model, arch), unmerged) <= 1e-5
    for key, value in model.state_dict().items():
        if key in base_weights:
            assert torch.allclose(value, base_weights[key], atol=1e-6), key


@pytest.mark.parametrize("arch,variant", CASES)
def test_unload_merged_is_plain_model_with_same_output(arch: str, variant: str) -> None:
    model = adapted(arch, variant)
    with torch.no_grad():
        expected = run(model, arch)
        plain = pk.unload(model, merge=True)
        assert plain is model
        assert not list(adapter_layers(model))
        assert rel_err(run(model, arch), expected) <= 1e-5


@pytest.mark.parametrize("arch,variant", CASES)
def test_save_load_round_trip(arch: str, variant: str, tmp_path) -> None:
    model = adapted(arch, variant)
    pk.save_adapter(model, tmp_path)
    fresh = build(arch)
    pk.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh, arch), run(model, arch))


@pytest.mark.parametrize("arch,variant", CASES)
def test_hf_peft_cross_loading(arch: str, variant: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = adapted(arch, variant)
    with torch.no_grad():
        ours = run(model, arch)
    # peftkit → HF PEFT
    pk.save_adapter(model, tmp_path / "pk")
    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        theirs = run(hf, arch)
    assert (theirs - ours).abs().max().item() <= 1e-5
    # HF PEFT → peftkit
    hf.save_pretrained(str(tmp_path / "hf"))
    back = build(arch)
    pk.load_adapter(back, tmp_path / "hf")
    with torch.no_grad():
        assert (run(back, arch) - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_several_active_adapters_are_summed_and_merge_together(arch: str) -> None:
    model = build(arch)
    with torch.no_grad():
        base = run(model, arch)
    pk.apply(model, VARIANTS["plain"](arch), name="a")
    # Only one active adapter may hold a full copy of a module (modules_to_save): "b" leaves the head to "a".
    pk.apply(model, VARIANTS["rslora"](arch).replace(modules_to_save=[]), name="b", train_heads=False)
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        pk.set_adapter(model, "a")
        out_a = run(model, arch)
        pk.set_adapter(model, "b")
        out_b = run(model, arch)
        pk.set_adapter(model, ["a", "b"])
        out_ab = run(model, arch)
        pk.merge(model)
        assert rel_err(run(model, arch), out_ab) <= 1e-5
        pk.unmerge(model)
    for _, layer in adapter_layers(model):
        # Deltas of several active adapters add up in each layer's weight.
        if isinstance(layer, LoRALayer) and layer.has_adapter("a") and layer.has_adapter("b"):
            merged = copy.deepcopy(layer)
            merged.merge(["a", "b"])
            expected = layer._base_weight() + layer.delta_weight("a") + layer.delta_weight("b")
            assert torch.allclose(merged._base_weight(), expected, atol=1e-6)
    assert not torch.equal(out_a, out_b) and not torch.equal(out_ab, base)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("arch", ["llama", "convnet"])
def test_half_precision_base_with_fp32_adapters_rounds_once_as_hf_peft(arch: str, use_dora: bool, tmp_path) -> None:
    """On a bf16 model HF PEFT keeps the adapter in fp32, adds the update to the base output in fp32 and rounds the
    sum once: outputs agree bit for bit (rounding the update first differs by an ulp)."""
    peft = pytest.importorskip("peft")
    hf = peft.get_peft_model(build(arch).to(torch.bfloat16), peft.LoraConfig(
        target_modules=ARCHS[arch].targets, r=4, init_lora_weights=False, use_dora=use_dora))
    hf.eval().save_pretrained(str(tmp_path))
    ours = pk.load_adapter(build(arch).to(torch.bfloat16), tmp_path)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        expected = run(hf, arch)
        assert expected.dtype == torch.bfloat16
        assert torch.equal(run(ours, arch), expected)


@pytest.mark.parametrize("method", [pk.LoRA, pk.DoRA])
def test_an_update_to_a_weight_tied_to_another_module_is_not_merged(method: type[pk.LoRA]) -> None:
    # GPT-2's lm_head uses the token embedding's weight: merging would change the head's outputs too.
    model = pk.apply(build("gpt2"), method(target_modules=["wte", "c_attn"], rank=2))
    randomize_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for attempt in (lambda: pk.merge(model), lambda: pk.unload(model)):
        with pytest.raises(pk.errors.MergeError, match=r"transformer.wte .*\['lm_head.weight'\].*nothing was merged"):
            attempt()
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert pk.list_adapters(model) == ["default"]
    untied = build("gpt2")
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    pk.apply(untied, method(target_modules=["wte", "c_attn"], rank=2))
    randomize_adapters(untied)
    with torch.no_grad():
        expected = run(untied, "gpt2")
        pk.merge(untied)
        assert rel_err(run(untied, "gpt2"), expected) <= 1e-5


@pytest.mark.parametrize("method", [pk.LoRA, pk.DoRA])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "convnet"])
def test_training_after_an_evaluation_under_inference_mode(arch: str, method: type[pk.LoRA]) -> None:
    # Caches filled under torch.inference_mode (DoRA's norms, sibling groups' stacked A) hold inference tensors,
    # which a training forward cannot save for backward.
    model = pk.apply(build(arch), method(target_modules=ARCHS[arch].targets, rank=2))
    randomize_adapters(model)
    fresh = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))  # long enough to group
    inputs = {"input_ids": ids[:, :7]} if arch == "convnet" else {"input_ids": ids}
    for _ in range(3):  # siblings group after a first call
        with torch.inference_mode():
            model(**inputs)
    grads = []
    for each in (model, fresh):
        out = each(**inputs)
        (out if arch == "convnet" else out.logits).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in each.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=1e-6)
