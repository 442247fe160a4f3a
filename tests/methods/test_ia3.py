"""(IA)³: formula, merge, save/load, HF PEFT parity (parameter count, cross-loading), training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.ia3 import IA3Layer

from models import ARCHS, build, randomize_adapters, run, train_losses

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
    out_layer = IA3Layer(base, is_feedforward=False)
    out_layer.add("a")
    out_layer.set_active(["a"])
    with torch.no_grad():
        out_layer.ia3_l["a"].copy_(torch.randn(3, 1))
    l_out = out_layer.ia3_l["a"].flatten()
    assert torch.allclose(out_layer(x), l_out * (x @ base.weight.T + base.bias), atol=1e-6)

    ff_layer = IA3Layer(base, is_feedforward=True)
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


def test_zero_scaling_cannot_be_merged_and_no_layer_is() -> None:
    model = build("llama")
    pk.apply(model, pk.IA3(target_modules=["v_proj"]))
    vectors = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        vectors[0].fill_(2.0)
        vectors[-1].zero_()  # the last layer's vector: the first layer is checked (and was merged) before it
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    with pytest.raises(MergeError, match="zero scaling"):
        pk.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, IA3Layer))


@pytest.mark.parametrize("other", [pk.Adapter(), pk.PromptTuning(num_virtual_tokens=3)])
def test_merging_beside_an_adapter_that_cannot_merge_changes_no_weight(other) -> None:
    model = build("llama")
    pk.apply(model, pk.IA3(target_modules=["v_proj"]), name="ia3")
    pk.apply(model, other, name="other")
    pk.set_adapter(model, ["ia3", "other"])
    randomize_adapters(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.merge(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, IA3Layer))


def test_feedforward_must_be_subset_of_targets() -> None:
    with pytest.raises(ConfigError, match="subset of target_modules"):
        pk.apply(build("llama"), pk.IA3(target_modules=["k_proj"], feedforward_modules=["down_proj"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])  # BERT's CASES also scale the attention's output.dense
def test_role_names_select_the_feedforward_targets_as_their_module_names_do(arch: str, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    config = pk.IA3(target_modules=["linear_k", "linear_v", "linear_fc2"], feedforward_modules=["linear_fc2"])
    by_role = pk.apply(build(arch), config)
    by_name = adapted(arch)
    layers = {n: m.is_feedforward for n, m in by_role.named_modules() if isinstance(m, IA3Layer)}
    assert layers == {n: m.is_feedforward for n, m in by_name.named_modules() if isinstance(m, IA3Layer)}
    assert any(layers.values()) and not all(layers.values())
    by_role.load_state_dict(by_name.state_dict())
    with torch.no_grad():
        expected = run(by_name, arch)
        assert torch.allclose(run(by_role, arch), expected, atol=1e-6)
    pk.save_adapter(by_role, tmp_path)
    hf = peft.PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(run(hf, arch), expected, atol=1e-5)


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
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.1)
    assert losses[-1] < losses[0] - 0.05


class ConvStack(nn.Module):
    """A grouped Conv2d, a Conv3d and a linear head: the convolutions HF PEFT's (IA)³ supports."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
        self.conv3 = nn.Conv3d(6, 4, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(x))                 # (b, 6, 5, 5)
        h = torch.relu(self.conv3(h.unsqueeze(2)))    # (b, 4, 1, 5, 5)
        return self.head(h.flatten(1))


CONV_TARGETS, CONV_FF = ["conv2", "conv3", "head"], ["conv2", "conv3"]


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvStack().eval()


def _conv_input() -> torch.Tensor:
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))


def test_conv_formula_shapes_and_grouped_merge() -> None:
    torch.manual_seed(0)
    x = _conv_input()
    for feedforward in (False, True):
        base = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
        layer = IA3Layer(base, is_feedforward=feedforward)
        layer.add("a")
        layer.set_active(["a"])
        channels = 4 if feedforward else 6
        assert tuple(layer.ia3_l["a"].shape) == (1, channels, 1, 1)
        with torch.no_grad():
            layer.ia3_l["a"].copy_(torch.rand(1, channels, 1, 1) + 0.5)
            l = layer.ia3_l["a"]
            expected = base(x * l) if feedforward else base(x) * l
            assert torch.allclose(layer(x), expected, atol=1e-6)
            assert torch.allclose(layer(x[0]), expected[0], atol=1e-6)  # unbatched input
            layer.merge(["a"])
            assert torch.allclose(base(x), expected, atol=1e-5)  # grouped input scaling folds per group
            layer.unmerge()
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_conv_merge_save_load_and_hf_cross_loading(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    x = _conv_input()
    model = pk.apply(_conv_model(), pk.IA3(target_modules=CONV_TARGETS, feedforward_modules=CONV_FF))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.rand_like(p) + 0.5)
        expected = model(x)
        with pk.disable_adapters(model):
            assert not torch.allclose(model(x), expected, atol=1e-4)
    pk.save_adapter(model, tmp_path / "pk")
    hf = peft.PeftModel.from_pretrained(_conv_model(), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x), expected, atol=1e-5)
        pk.merge(model)
        assert torch.allclose(model(x), expected, atol=1e-5)

    config = peft.IA3Config(target_modules=CONV_TARGETS, feedforward_modules=CONV_FF)
    hf_model = peft.get_peft_model(_conv_model(), config)
    ours = pk.apply(_conv_model(), pk.IA3(target_modules=CONV_TARGETS, feedforward_modules=CONV_FF))
    assert pk.count_parameters(ours) == tuple(hf_model.get_nb_trainable_parameters())
    with torch.no_grad():
        for p in hf_model.parameters():
            if p.requires_grad:
                p.copy_(torch.rand_like(p) + 0.5)
    hf_model.eval().save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(_conv_model(), tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(loaded(x), hf_model(x), atol=1e-5)


@pytest.mark.parametrize("target", ["embed", "conv1"])
def test_embedding_and_conv1d_are_refused_naming_the_supported_types(target: str) -> None:
    # HF PEFT's (IA)³ has no Embedding or Conv1d layer, so an adapter on one could not cross-load.
    with pytest.raises(pk.errors.UnsupportedLayerError) as info:
        pk.apply(build("convnet"), pk.IA3(target_modules=[target]))
    message = str(info.value)
    assert "Conv2d" in message and "Conv3d" in message and "Linear" in message and "Conv1D" in message
