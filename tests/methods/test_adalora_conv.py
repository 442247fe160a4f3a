"""AdaLoRA on nn.Conv2d: the formula, merge == unmerged, HF PEFT parity both ways on disk, parameter counts, and
the rank allocator scoring, masking and saving conv triplets like linear ones; grouped convolutions refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit as pk
from peftkit.core.state import adapter_layers
from peftkit.errors import UnsupportedLayerError
from peftkit.methods.adalora import SVDLinear, orthogonality_loss
from peftkit.methods.adalora_conv import SVDConv2d

peft = pytest.importorskip("peft")
TARGETS = ["c1", "c2", "fc"]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class ConvNet(nn.Module):
    """A padded Conv2d, a strided and dilated Conv2d with a non-square kernel, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.c2 = nn.Conv2d(6, 4, kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=(2, 1))
        self.fc = nn.Linear(4 * 4 * 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))                  # (b, 6, 8, 8)
        h = torch.tanh(self.c2(h))                  # (b, 4, 4, 5)
        return self.fc(h.flatten(1))                # (b, 5)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def config(**kw) -> pk.AdaLoRA:
    base = dict(target_modules=TARGETS, init_rank=4, target_rank=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
                alpha=8)
    return pk.AdaLoRA(**{**base, **kw})


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Nonzero λ and perturbed P, Q, so every triplet changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_formula_and_merge() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 5, kernel_size=(3, 2), stride=(1, 2), padding=1, dilation=(2, 1))
    layer = SVDConv2d(base)
    layer.add("a", 3, 3, alpha=4.0, dropout=0.0)
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_E["a"].normal_()
    P, Q, lam = layer.lora_B["a"], layer.lora_A["a"], layer.lora_E["a"].flatten()
    assert Q.shape == (3, 3 * 3 * 2) and P.shape == (5, 3) and layer.lora_E["a"].shape == (3, 1)
    delta = (4.0 / (3 + 1e-5) * P @ torch.diag(lam) @ Q).reshape(base.weight.shape)
    x = torch.randn(2, 3, 9, 9)
    expected = base(x) + F.conv2d(x, delta, stride=(1, 2), padding=1, dilation=(2, 1))
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with torch.no_grad():
        layer.merge(["a"])
        assert torch.allclose(base(x), expected, atol=1e-5)
        layer.unmerge()
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_layers_and_parameter_count_match_hf() -> None:
    ours = pk.apply(_model(), config())
    layers = dict(adapter_layers(ours))
    assert isinstance(layers["c1"], SVDConv2d) and isinstance(layers["c2"], SVDConv2d)
    assert type(layers["fc"]) is SVDLinear
    hf = peft.get_peft_model(_model(), peft.AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, tinit=1,
                                                          tfinal=2, deltaT=1, total_step=8, lora_alpha=8))
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    theirs = {k.removeprefix("base_model.model."): v.shape for k, v in hf.named_parameters() if ".default" in k}
    assert {k: v.shape for k, v in ours.named_parameters() if ".default" in k} == theirs


def test_peftkit_to_hf_and_back_with_merge(tmp_path: Path) -> None:
    model = pk.apply(_model(), config())
    _randomize(model)
    with torch.no_grad():
        expected = model(X)
        assert (expected - _model()(X)).abs().max() > 1e-2  # the adapter really changes the output
    pk.save_adapter(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(_model(), str(tmp_path)).eval()
    again = pk.load_adapter(_model(), tmp_path)
    with torch.no_grad():
        assert (hf(X) - expected).abs().max() <= 1e-5
        assert (again(X) - expected).abs().max() <= 1e-5
        assert (pk.merge(again)(X) - expected).abs().max() <= 1e-5


def test_hf_to_peftkit(tmp_path: Path) -> None:
    hf = peft.get_peft_model(_model(), peft.AdaLoraConfig(target_modules=TARGETS, init_r=4, target_r=2, tinit=1,
                                                          tfinal=2, deltaT=1, total_step=8, lora_alpha=8))
    _randomize(hf, seed=3)
    hf.eval()
    hf.save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(_model(), tmp_path)
    with torch.no_grad():
        expected = hf(X)
        assert (loaded(X) - expected).abs().max() <= 1e-5
        hf.merge_adapter()
        assert (pk.merge(loaded)(X) - hf(X)).abs().max() <= 1e-5


def test_schedule_masks_conv_triplets_and_saves_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = pk.apply(_model(), config())
    layers = dict(adapter_layers(model))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    for step in range(8):
        loss = F.mse_loss(model(X), target) + 0.1 * orthogonality_loss(model, "default")
        loss.backward()
        opt.step()
        pk.adalora_step(model, step)
        opt.zero_grad()
    model.eval()
    kept = {q: int(layer.rank_mask["default"].sum()) for q, layer in layers.items()}
    assert sum(kept.values()) == 2 * len(TARGETS)  # the final budget, shared by convs and the linear
    assert kept["c1"] < 4 or kept["c2"] < 4  # a conv lost triplets
    for layer in layers.values():
        assert torch.all(layer.lora_E["default"][~layer.rank_mask["default"]] == 0)
    with torch.no_grad():
        expected = model(X)
    pk.save_adapter(model, tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert {k: sum(v) for k, v in pattern.items()} == {f"{q}.lora_E": n for q, n in kept.items()}
    hf = peft.PeftModel.from_pretrained(_model(), str(tmp_path)).eval()  # HF resizes by rank_pattern
    again = pk.load_adapter(_model(), tmp_path)
    assert again.get_submodule("c1").lora_A["default"].shape == (kept["c1"], 3 * 3 * 3)
    with torch.no_grad():
        assert (hf(X) - expected).abs().max() <= 1e-5
        assert (again(X) - expected).abs().max() <= 1e-5


def test_orthogonality_loss_covers_conv_factors() -> None:
    model = pk.apply(_model(), config(target_modules=["c2"]))
    layer = model.get_submodule("c2")
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    eye = torch.eye(4)
    expected = (torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)) / 2
    assert torch.allclose(orthogonality_loss(model, "default"), expected)


def test_grouped_conv_is_refused_before_the_model_changes() -> None:
    model = _model()
    model.c2 = nn.Conv2d(6, 4, kernel_size=3, groups=2)
    with pytest.raises(UnsupportedLayerError, match="groups=2.*exclude_modules"):
        pk.apply(model, config())
    assert not any(True for _ in adapter_layers(model))


def test_half_precision_base_rounds_once_as_hf_peft(tmp_path: Path) -> None:
    """HF PEFT adds the fp32 conv update to a half-precision base output in place: one rounding, bit for bit here."""
    model = pk.apply(_model().to(torch.bfloat16), config())
    _randomize(model)
    pk.save_adapter(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(_model().to(torch.bfloat16), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(model(X.to(torch.bfloat16)), hf(X.to(torch.bfloat16)))
