"""(IA)³: formula, merge, save/load, HF PEFT parity (parameter count, cross-loading), training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.ia3 import IA3Linear

from models import ARCHS, build, randomize_adapters, run

CASES = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


def adapted(arch: str, seed: int = 0) -> nn.Module:
    targets, ff = CASES[arch]
    model = build(arch)
    pk.apply(model, pk.IA3(target_modules=targets, feedforward_modules=ff))
    randomize_adapters(model, seed)
    with torch.no_grad():  # IA3 vectors live around 1, not 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    return model


def test_formula_output_and_input_scaling() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    out_layer = IA3Linear(base, is_feedforward=False)
    out_layer.add("a")
    out_layer.set_active(["a"])
    with torch.no_grad():
        out_layer.ia3_l["a"].copy_(torch.randn(3, 1))
    l_out = out_layer.ia3_l["a"].flatten()
    assert torch.allclose(out_layer(x), l_out * (x @ base.weight.T + base.bias), atol=1e-6)

    ff_layer = IA3Linear(base, is_feedforward=True)
    ff_layer.add("a")
    ff_layer.add("b")
    ff_layer.set_active(["a", "b"])
    with torch.no_grad():
        ff_layer.ia3_l["a"].copy_(torch.randn(1, 5))
        ff_layer.ia3_l["b"].copy_(torch.randn(1, 5))
    l_in = (ff_layer.ia3_l["a"] * ff_layer.ia3_l["b"]).flatten()  # several active adapters multiply
    assert torch.allclose(ff_layer(x), (l_in * x) @ base.weight.T + base.bias, atol=1e-6)
    assert tuple(ff_layer.ia3_l["a"].shape) == (1, 5) and tuple(out_layer.ia3_l["a"].shape) == (3, 1)


@pytest.mark.parametrize("arch", list(CASES))
def test_identity_init_merge_unmerge_and_disable(arch: str) -> None:
    model = build(arch)
    targets, ff = CASES[arch]
    with torch.no_grad():
        base = run(model, arch)
        pk.apply(model, pk.IA3(target_modules=targets, feedforward_modules=ff))
        assert torch.allclose(run(model, arch), base, atol=1e-6)
    model = adapted(arch)
    with torch.no_grad():
        unmerged = run(model, arch)
        assert not torch.allclose(unmerged, base, atol=1e-6)
        with pk.disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        pk.merge(model, safe=True)
        assert torch.allclose(run(model, arch), unmerged, atol=1e-5)
        pk.unmerge(model)
        assert torch.allclose(run(model, arch), unmerged, atol=1e-5)
        pk.unload(model, merge=True)
        assert torch.allclose(run(model, arch), unmerged, atol=1e-5)


def test_zero_scaling_cannot_be_merged() -> None:
    model = build("llama")
    pk.apply(model, pk.IA3(target_modules=["v_proj"]))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).zero_()
    with pytest.raises(MergeError, match="zero scaling"):
        pk.merge(model)


def test_feedforward_must_be_subset_of_targets() -> None:
    with pytest.raises(ConfigError, match="subset of target_modules"):
        pk.apply(build("llama"), pk.IA3(target_modules=["k_proj"], feedforward_modules=["down_proj"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_and_hf_cross_loading(arch: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    targets, ff = CASES[arch]
    model = adapted(arch)
    with torch.no_grad():
        expected = run(model, arch)
    pk.save_adapter(model, tmp_path / "pk")
    again = pk.load_adapter(build(arch), tmp_path / "pk")
    with torch.no_grad():
        assert torch.allclose(run(again, arch), expected, atol=1e-6)

    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.allclose(run(hf, arch), expected, atol=1e-5)

    hf_model = peft.get_peft_model(build(arch), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    ours = pk.apply(build(arch), pk.IA3(target_modules=targets, feedforward_modules=ff))
    assert pk.count_parameters(ours) == tuple(hf_model.get_nb_trainable_parameters())
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.requires_grad:
                p.copy_(torch.rand_like(p) + 0.5)
    hf_model.eval()
    hf_model.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(run(loaded, arch), run(hf_model, arch), atol=1e-5)


def test_training_lowers_the_loss() -> None:
    model = build("llama")
    model.train()
    pk.apply(model, pk.IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ids = ARCHS["llama"].inputs()["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
