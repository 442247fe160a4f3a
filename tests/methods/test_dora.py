"""DoRA: the formula, HF PEFT cross-loading both ways, exact merge/unmerge, norms without the dense BA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.methods.dora import DoRAEmbedding, DoRALinear, row_norms

from models import ARCHS, build, perturb_dora, randomize_adapters, run

IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
# Llama: linear layers and the token embedding; GPT-2: Conv1D (fan_in_fan_out) layers.
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "wte"]}


def test_row_norms_equal_the_dense_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    W, A, B = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((20, 12), (3, 12), (20, 3)))
    torch.testing.assert_close(row_norms(W, A, B, 0.7), (W + 0.7 * B @ A).norm(dim=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_peft_adapter_loads_with_equal_logits(arch: str, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    hf = get_peft_model(build(arch), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True))
    perturb_dora(hf)
    hf.eval()
    hf.save_pretrained(tmp_path)
    model = pk.load_adapter(build(arch), tmp_path)
    assert {type(layer) for _, layer in adapter_layers(model)} == {DoRALinear, DoRAEmbedding}
    torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkit_adapter_loads_in_hf_peft_with_equal_logits(arch: str, tmp_path) -> None:
    import json

    from peft import PeftModel

    model = pk.apply(build(arch), pk.DoRA(target_modules=TARGETS[arch], rank=4, alpha=8, use_rslora=True))
    perturb_dora(model)
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    hf = PeftModel.from_pretrained(build(arch), tmp_path).eval()
    torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dora_first", [False, True])
def test_lora_and_dora_adapters_share_layers_as_in_hf_peft(dora_first: bool, tmp_path) -> None:
    """HF PEFT keeps a LoRA and a DoRA adapter on the same layers; loading both, in either order, gives its
    logits for each, and saving both gives files HF PEFT loads back to the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = TARGETS["llama"][:3]
    hf = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    hf.add_adapter("d", LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True))
    perturb_dora(hf)
    hf.eval().save_pretrained(tmp_path / "hf")
    model = build("llama")
    order = [("d", tmp_path / "hf" / "d"), ("default", tmp_path / "hf")]
    for name, path in order if dora_first else order[::-1]:
        pk.load_adapter(model, path, name=name)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoRALinear) and set(layer.lora_magnitude_vector) == {"d"}
    pk.save_adapter(model, tmp_path / "pk")
    back = PeftModel.from_pretrained(build("llama"), tmp_path / "pk").eval()
    back.load_adapter(tmp_path / "pk" / "d", adapter_name="d")
    with torch.no_grad():
        for name in ("default", "d"):
            pk.set_adapter(model, name)
            hf.set_adapter(name)
            back.set_adapter(name)
            torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, rtol=0, atol=1e-5)


def test_a_plain_lora_adapter_on_dora_layers_takes_the_fused_lora_path() -> None:
    torch.manual_seed(0)
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=2, alpha=4))
    perturb_dora(model)
    plain = copy.deepcopy(model)
    pk.apply(model, pk.DoRA(target_modules=["q_proj"], rank=2, alpha=4), name="d")
    pk.set_adapter(model, "default")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DoRALinear)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "LoRAUpdateBackward"  # (under a view)
    torch.testing.assert_close(out, plain.model.layers[0].self_attn.q_proj(x), rtol=0, atol=1e-6)


def test_fresh_adapter_is_identity_and_merge_unmerge_exact() -> None:
    base = build("llama")
    model = pk.apply(copy.deepcopy(base), pk.DoRA(target_modules=TARGETS["llama"], rank=4))
    torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=0, atol=1e-5)  # B = 0, m = ‖W‖
    perturb_dora(model)
    unmerged = model(IDS).logits
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    pk.merge(model)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=1e-5)
    pk.unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=0, atol=1e-6)


def test_formula_and_detached_norm_gradients() -> None:
    """y = m/‖W+sBA‖ · (W + sBA) x with the norm a constant for autograd (paper §4.3)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = DoRALinear(base)
    layer.add("a", 3, 6.0, init_B="gaussian")
    layer.add_magnitude("a")
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].mul_(1.3)
    x = torch.randn(4, 12)
    A, B, m = layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.lora_magnitude_vector["a"]
    merged = base.weight + 2.0 * B @ A
    expected = (m / merged.norm(dim=1).detach())[:, None] * merged
    reference = x @ expected.T + base.bias
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(layer(x).sum(), (A, B, m))
    ref_grads = torch.autograd.grad(reference.sum(), (A, B, m))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_norm_is_cached_until_a_factor_changes() -> None:
    layer = DoRALinear(nn.Linear(8, 6))
    layer.add("a", 2, 2.0, init_B="gaussian")
    layer.add_magnitude("a")
    first = layer.weight_norm("a")
    assert layer.weight_norm("a") is first
    with torch.no_grad():
        layer.lora_B["a"].weight.add_(1.0)  # an optimizer step changes B in place
    second = layer.weight_norm("a")
    assert second is not first
    lora = layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    torch.testing.assert_close(second, (layer.base_layer.weight + 1.0 * lora).norm(dim=1))


def test_embedding_magnitude_is_per_dimension() -> None:
    model = pk.apply(build("llama"), pk.DoRA(target_modules=["embed_tokens"], rank=2))
    layer = model.model.embed_tokens
    assert layer.lora_magnitude_vector["default"].shape == (32,)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], layer.base_layer.weight.norm(dim=0))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "convnet"])
@pytest.mark.parametrize("order", [["lora", "dora"], ["dora", "lora"]])
def test_a_dora_adapter_active_beside_lora_merges_to_the_same_outputs(arch: str, order: list[str]) -> None:
    # A DoRA update depends on the weight it is computed from: it merges first, whatever the active order.
    targets = ARCHS[arch].targets
    model = pk.apply(build(arch), pk.LoRA(target_modules=targets, rank=2, alpha=4), name="lora")
    pk.apply(model, pk.DoRA(target_modules=targets[:3], rank=2, alpha=3), name="dora")
    randomize_adapters(model, seed=1)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        pk.set_adapter(model, "lora")
        lora_only = run(model, arch)
        pk.set_adapter(model, order)
        both = run(model, arch)
        pk.merge(model)
        torch.testing.assert_close(run(model, arch), both, rtol=0, atol=1e-5)
        with pk.disable_adapters(model):
            pass
        torch.testing.assert_close(run(model, arch), both, rtol=0, atol=1e-5)
        pk.unmerge(model)
        for key, value in model.state_dict().items():
            if key in weights:
                torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-4)  # fp32 round-off, /g
        pk.merge(model)
        pk.delete_adapter(model, "dora")  # unmerged although merged before the LoRA adapter
        torch.testing.assert_close(run(model, arch), lora_only, rtol=0, atol=1e-5)


def test_two_active_dora_adapters_on_a_layer_are_not_merged() -> None:
    # Each computes its update from the unmerged weight; merged in turn, the second would build on the first.
    model = pk.apply(build("llama"), pk.DoRA(target_modules=TARGETS["llama"], rank=2), name="a")
    pk.apply(model, pk.DoRA(target_modules=["v_proj"], rank=2), name="b")
    pk.apply(model, pk.LoRA(target_modules=["v_proj"], rank=2), name="c")
    randomize_adapters(model, seed=2)
    pk.set_adapter(model, ["a", "b"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        both = model(IDS).logits
        for attempt in (lambda: pk.merge(model), lambda: pk.merge(model, "a"), lambda: pk.unload(model)):
            with pytest.raises(pk.errors.MergeError, match=r"model.layers.0.self_attn.v_proj: DoRA adapter\(s\) "
                                                           r"\['a', 'b'\].*nothing was merged"):
                attempt()
            assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert not any(layer.merged_adapters for _, layer in adapter_layers(model))
        pk.merge(model, "c")  # an inactive adapter: a deliberate change, which the active ones build on
        pk.unmerge(model)
        torch.testing.assert_close(model(IDS).logits, both, rtol=0, atol=1e-5)
        pk.set_adapter(model, ["a", "c"])
        expected = model(IDS).logits
        pk.merge(model)
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)
