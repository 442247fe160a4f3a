"""LoRA with a trained bias on B (HF PEFT's ``lora_bias``): ``y = base(x) + s·(B A dropout(x) + b)``.

HF PEFT cross-loading both ways, training, merging (refused where the base layer has no bias), the fast paths
left to the straightforward formula, and what combine, convert and prune do with the bias.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers, get_state
from peftkit.errors import ConfigError, MergeError
from peftkit.methods import lora_groups
from peftkit.methods.lora_kernels import plain_adapter
from peftkit.methods.lora_layers import LoRALayer, LoRALinear

from models import ARCHS, build, randomize_adapters, run

peft = pytest.importorskip("peft")

#: Architecture → targets: Conv1D with biases (GPT-2), bias-less linears (Llama), biased linears with a saved
#: classifier (BERT), biased convolutions and a linear (ConvNet).
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"],
           "bert": ["query", "intermediate.dense"], "convnet": ["conv1", "conv2", "proj"]}
TASK = {"bert": "SEQ_CLS"}


def lora(arch: str, **kwargs: object) -> pk.LoRA:
    return pk.LoRA(**{"target_modules": TARGETS[arch], "rank": 4, "alpha": 8, "lora_bias": True,  # type: ignore[arg-type]
                      "task_type": TASK.get(arch), **kwargs})


def biased(arch: str, seed: int = 0, **kwargs: object) -> nn.Module:
    """``arch`` with a ``lora_bias`` adapter whose every tensor (the biases included) is random."""
    model = pk.apply(build(arch), lora(arch, **kwargs))
    randomize_adapters(model, seed)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(q, layer) for q, layer in adapter_layers(model) if isinstance(layer, LoRALayer)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ------------------------------------------------------------------------------------ HF PEFT parity


@pytest.mark.parametrize("arch,bias", [*((arch, "none") for arch in TARGETS), ("gpt2", "all"), ("bert", "lora_only")])
def test_hf_peft_adapter_loads_and_saves_back_exactly(arch: str, bias: str, tmp_path: Path) -> None:
    """With ``bias="all"`` too, whose trained base biases are saved beside the adapter (b on B once, as its own)."""
    hf = peft.get_peft_model(build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                          lora_bias=True, bias=bias, task_type=TASK.get(arch)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        want = run(hf, arch)

    ours = pk.load_adapter(build(arch), tmp_path / "hf")
    assert all(layer.up_bias("default") is not None for _, layer in lora_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(run(ours, arch), want, rtol=1e-5, atol=1e-6)

    pk.save_adapter(ours, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["lora_bias"] is True
    theirs = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    assert sum(k.endswith(".lora_B.bias") for k in mine) == len(lora_layers(ours))
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(back, arch), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "convnet"])
def test_peftkit_adapter_loads_in_hf_peft(arch: str, tmp_path: Path) -> None:
    ours = biased(arch)
    with torch.no_grad():
        want = run(ours, arch)
    pk.save_adapter(ours, tmp_path)
    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert all(hf.base_model.model.get_submodule(q).lora_bias["default"] for q, _ in lora_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(run(hf, arch), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ training


def test_bias_starts_at_zero_trains_and_is_counted(capsys: pytest.CaptureFixture[str]) -> None:
    plain = pk.apply(build("gpt2"), lora("gpt2", lora_bias=False))
    model = pk.apply(build("gpt2"), lora("gpt2", init_B="gaussian"))
    layers = lora_layers(model)
    outs = sum(layer.up_bias("default").numel() for _, layer in layers)  # type: ignore[union-attr]
    assert outs == 2 * (96 + 128)  # c_attn (3·32) and c_fc (4·32) in both blocks
    assert pk.count_parameters(model)[0] == pk.count_parameters(plain)[0] + outs
    pk.print_trainable_parameters(model)
    assert f"trainable params: {pk.count_parameters(model)[0]:,d}" in capsys.readouterr().out

    for _, layer in layers:
        bias = layer.up_bias("default")
        assert bias is not None and bias.requires_grad and not bias.any()
    ids = ARCHS["gpt2"].inputs()["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for qualname, layer in layers:
        grad = layer.up_bias("default").grad  # type: ignore[union-attr]
        assert grad is not None and grad.abs().sum() > 0, qualname


# ------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("arch", ["gpt2", "bert", "convnet"])
def test_merge_equals_unmerged_and_unmerge_restores_weight_and_bias(arch: str) -> None:
    model = biased(arch)
    base = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    assert any(k.endswith("base_layer.bias") for k in base)
    with torch.no_grad():
        unmerged = run(model, arch)
        pk.merge(model, safe=True)
        merged_bias = {q: layer.base_layer.bias.clone() for q, layer in lora_layers(model)}
        torch.testing.assert_close(run(model, arch), unmerged, rtol=1e-5, atol=1e-5)
        pk.unmerge(model)
        torch.testing.assert_close(run(model, arch), unmerged, rtol=1e-5, atol=1e-5)
    for qualname, layer in lora_layers(model):  # the merged bias moved by exactly s·b
        b = layer.up_bias("default")
        assert b is not None
        torch.testing.assert_close(merged_bias[qualname] - base[f"{qualname}.base_layer.bias"],
                                   layer.scaling["default"] * b.detach(), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        if key in base:
            torch.testing.assert_close(value, base[key], rtol=0, atol=1e-6, msg=key)

    plain = pk.unload(biased(arch), merge=True)
    with torch.no_grad():
        torch.testing.assert_close(run(plain, arch), unmerged, rtol=1e-5, atol=1e-5)


def _mixed() -> nn.Module:
    """A biased linear first (it would merge first), a bias-less one last."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))


def test_merge_into_a_layer_without_bias_is_refused_before_anything_changes(caplog: pytest.LogCaptureFixture) -> None:
    model = _mixed()
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        pk.apply(model, pk.LoRA(target_modules=["0", "2"], rank=2, lora_bias=True))
    assert "lora_bias=True; it cannot be merged into layers without a bias: 2 (1 in all)" in caplog.text
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"adapter 'default' at 2 has lora_bias=True .* no bias .* nothing was merged"):
        pk.merge(model)
    assert_unchanged(model, before)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
    with pytest.raises(MergeError, match="lora_bias"):
        pk.unload(model, merge=True)
    assert_unchanged(model, before)
    assert len(lora_layers(model)) == 2
    plain = pk.unload(model, merge=False)  # dropping the adapter is always possible
    assert not list(adapter_layers(plain))


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_into_a_quantized_base_with_bias(bits: int) -> None:
    from peftkit.quant import Linear4bit, Linear8bit, quantize

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    def adapted() -> nn.Module:
        model = pk.apply(quantize(base(), bits=bits, compute_dtype=torch.float32),
                         pk.LoRA(target_modules=["0", "2"], rank=4, alpha=8, lora_bias=True))
        randomize_adapters(model)
        return model

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        noise = (base()(x) - quantize(base(), bits=bits, compute_dtype=torch.float32)(x)).abs().mean()
    model = adapted()
    layers = lora_layers(model)
    assert all(isinstance(layer.base_layer, Linear4bit if bits == 4 else Linear8bit) for _, layer in layers)
    bias = {q: layer.base_layer.bias.detach().clone() for q, layer in layers}
    with torch.no_grad():
        unmerged = model(x)
        pk.merge(model)
        for qualname, layer in layers:  # the bias is float: exact, only the weight is re-quantized
            shift = layer.scaling["default"] * layer.up_bias("default").detach()  # type: ignore[union-attr]
            torch.testing.assert_close(layer.base_layer.bias, bias[qualname] + shift, rtol=1e-6, atol=1e-6)
        assert 0 < (model(x) - unmerged).abs().mean() < 2 * noise  # re-quantizing: as large as quantizing
        pk.unmerge(model)
    for qualname, layer in layers:
        torch.testing.assert_close(layer.base_layer.bias.detach(), bias[qualname], rtol=0, atol=1e-6)

    plain = pk.unload(adapted(), merge=True, dequantize=True)  # into float copies: exact
    assert all(type(m) is nn.Linear for m in (plain[0], plain[2]))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("make", [
    lambda: pk.DoRA(target_modules=["q_proj"], lora_bias=True),
    lambda: pk.CanonicalLoRA(target_modules=["q_proj"], lora_bias=True),
    lambda: pk.LoRA(target_modules=["q_proj"], lora_bias="yes"),
], ids=["dora", "canonical", "not-a-bool"])
def test_configs_that_cannot_have_lora_bias_are_refused(make: object) -> None:
    with pytest.raises(ConfigError, match="lora_bias="):
        make()  # type: ignore[operator]


def test_an_embedding_target_is_refused_before_the_model_is_touched() -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"lora_bias=True is not supported on 'model.embed_tokens' \(Embedding.*"
                                          r"exclude_modules=\['model.embed_tokens'\], or set lora_bias=False"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj", "embed_tokens"], lora_bias=True))
    assert_unchanged(model, before)
    assert not list(adapter_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_hf_file_with_dora_and_lora_bias_is_refused(tmp_path: Path) -> None:
    pk.save_adapter(biased("gpt2"), tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "use_dora": True}))
    model = build("gpt2")
    with pytest.raises(ConfigError, match="DoRA does not support lora_bias=True"):
        pk.load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))


# ------------------------------------------------------------------------------------ the straightforward path


@pytest.mark.parametrize("arch,target", [("llama", "model.layers.0.self_attn.q_proj"),
                                         ("gpt2", "transformer.h.0.attn.c_attn")])
def test_training_forward_and_gradients_equal_the_formula(arch: str, target: str) -> None:
    """nn.Linear (fused-node fast path) and Conv1D (fused update): with a bias on B neither may run, since
    neither adds b."""
    model = biased(arch)
    model.train()
    layer = model.get_submodule(target)
    assert isinstance(layer, LoRALinear)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert plain_adapter(layer, x) is None
    A, B, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.up_bias("default")
    assert b is not None
    W, b0, s = layer.kind.weight(layer.base_layer), layer.base_layer.bias, layer.scaling["default"]
    grad = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(5))

    out = layer(x)
    out.backward(grad)
    ref_x, ref_A, ref_B, ref_b = (t.detach().clone().requires_grad_(True) for t in (x, A, B, b))
    ref = F.linear(ref_x, W, b0) + s * (F.linear(F.linear(ref_x, ref_A), ref_B) + ref_b)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in ((x.grad, ref_x.grad), (A.grad, ref_A.grad), (B.grad, ref_B.grad), (b.grad, ref_b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_layers_with_a_bias_on_B_never_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k, v read one input and group (one fused node) without lora_bias; with it they stay apart."""
    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)  # group even the tiny test batch
    ids = ARCHS["llama"].inputs()["input_ids"]
    for lora_bias, grouped in ((False, True), (True, False)):
        model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=lora_bias))
        model.train()
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
        q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
        assert (lora_groups.group_of(q_proj) is not None) is grouped


# ------------------------------------------------------------------------------------ combine, convert, prune


def _two_adapters() -> nn.Module:
    """GPT-2 with adapter ``a`` (lora_bias) and ``b`` (none) on the same layers, different ranks and scales."""
    model = pk.apply(build("gpt2"), lora("gpt2"), name="a")
    pk.apply(model, lora("gpt2", lora_bias=False, rank=2, alpha=5, use_rslora=True), name="b")
    randomize_adapters(model)
    return model


def test_combine_cat_is_exact_with_lora_bias() -> None:
    model = _two_adapters()
    pk.combine(model, {"a": 0.7, "b": -0.4}, method="cat", name="mix")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for qualname, layer in lora_layers(model):
            want = 0.7 * layer._module_update("a", x) - 0.4 * layer._module_update("b", x)
            torch.testing.assert_close(layer._module_update("mix", x), want, rtol=1e-5, atol=1e-6, msg=qualname)
            assert layer.up_bias("mix") is not None
    config = get_state(model).configs["mix"]
    assert isinstance(config, pk.LoRA) and config.lora_bias is True


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_combine_other_methods_refuse_lora_bias(method: str) -> None:
    model = _two_adapters()
    with pytest.raises(ConfigError, match=r"adapters \['a'\] have lora_bias=True .* only method='cat'"):
        pk.combine(model, {"a": 0.5, "b": 0.5}, method=method, name="mix")
    assert "mix" not in pk.list_adapters(model)


def test_convert_to_canonical_refuses_lora_bias(tmp_path: Path) -> None:
    """Refused before any adapter is converted: ``plain`` (converted first otherwise) stays as it was."""
    model = pk.apply(build("gpt2"), lora("gpt2", lora_bias=False), name="plain")
    pk.apply(model, lora("gpt2"), name="default")
    randomize_adapters(model)
    before = snapshot(model)
    with pytest.raises(ConfigError, match="adapter 'default' has lora_bias=True .* CanonicalLoRA does not support"):
        pk.convert(model, to="canonical")
    with pytest.raises(ConfigError, match="lora_bias=True .* CanonicalLoRA does not support"):
        pk.save_adapter(model, tmp_path, name="default", layout="canonical")
    assert_unchanged(model, before)
    assert all(type(config) is pk.LoRA for config in get_state(model).configs.values())
    pk.convert(model, to="performant")  # already performant: nothing to do
    assert_unchanged(model, before)


@pytest.mark.parametrize("method,kwargs", [("rank", {"target_rank": 2}), ("magnitude", {"sparsity": 0.5})])
def test_prune_keeps_the_bias(method: str, kwargs: dict[str, object]) -> None:
    model = biased("gpt2")
    bias = {q: layer.up_bias("default").detach().clone() for q, layer in lora_layers(model)}  # type: ignore[union-attr]
    pk.prune(model, "default", method=method, **kwargs)  # type: ignore[arg-type]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    for qualname, layer in lora_layers(model):
        b = layer.up_bias("default")
        assert b is not None and b.requires_grad and torch.equal(b.detach(), bias[qualname]), qualname
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape[0] == (2 if method == "rank" else 4)
        with torch.no_grad():
            want = layer.scaling["default"] * (x @ A.T @ B.T + b)
            torch.testing.assert_close(layer._module_update("default", x), want, rtol=1e-5, atol=1e-6)


def test_training_config_passes_lora_bias(tmp_path: Path) -> None:
    from peftkit.train.config import load_config
    from peftkit.train.tasks import peft_config

    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  pretrained: some/dir\npeft:\n  method: lora\n  target_modules: [q_proj]\n")
    config = peft_config(load_config(path, ["peft.lora_bias=true"]))
    assert isinstance(config, pk.LoRA) and config.lora_bias is True
