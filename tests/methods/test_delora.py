"""DeLoRA against HF PEFT: the normalised update, initialisation (fp32 and bf16 bases), forward, gradients (with
dropout too), files both ways, merging, several adapters and errors, on a tiny Llama and OPT (biased projections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_prompt import batch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.delora import DeLoRALayer
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_match_hf,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    assert_same_tensors_as_hf,
    build,
    check_two_adapters_as_hf,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

FIELDS: dict[str, Any] = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
#: HF PEFT's names for peftkit's fields.
HF_NAMES = {"rank": "r", "layers": "layers_to_transform"}


def hf_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    theirs = {HF_NAMES.get(k, k): v for k, v in {**FIELDS, **fields}.items()}
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.DeloraConfig(task_type="CAUSAL_LM", **theirs)).eval()


def ours_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return pk.apply(base, pk.DeLoRA(**{**FIELDS, **fields}))


def copy_hf_tensors(hf: nn.Module, ours: nn.Module, seed: int = 0) -> None:
    """Random tensors in HF PEFT's trainable tensors (λ off its start, B non-zero), copied into peftkit's."""
    gen = torch.Generator().manual_seed(seed)
    mine = trainable_tensors(ours)
    with torch.no_grad():
        for name, tensor in trainable_tensors(hf).items():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.3)
            mine[name].copy_(tensor)


def test_the_update_is_the_formula_written_out_and_bounded_by_lambda() -> None:
    torch.manual_seed(0)
    layer = DeLoRALayer(nn.Linear(12, 8))
    layer.add("default", rank=3, delora_lambda=2.5, dropout=0.0, init_weights=False)
    layer.set_active(["default"])
    a, b = layer.delora_A["default"].detach(), layer.delora_B["default"].detach()
    weight = layer.base_layer.weight.detach()
    expected = torch.zeros(8, 12)
    for i in range(3):  # ΔW = (λ/r) Σᵢ bᵢaᵢᵀ / (‖aᵢ‖‖bᵢ‖) · diag(w), one rank-1 term at a time
        expected += torch.outer(b[:, i], a[i]) / (a[i].norm() * b[:, i].norm())
    expected = 2.5 / 3 * expected * weight.norm(dim=0)
    delta = layer.delta_weight("default")
    assert torch.allclose(delta, expected, atol=1e-6)
    assert bool((delta.norm(dim=0) <= 2.5 * weight.norm(dim=0) + 1e-6).all())  # each column bounded by λ·‖W₀ column‖
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-6)
    # Zero factors give a zero update (their norms are clamped), not NaN.
    with torch.no_grad():
        layer.delora_B["default"].zero_()
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("init_weights", [True, False])
def test_initialisation_and_forward_equal_hf(dtype: torch.dtype, init_weights: bool) -> None:
    """The same draws from the global generator in HF PEFT's order; over bf16 rounded to it and kept in fp32, w taken
    from the bf16 weight; bit-equal logits."""
    hf = hf_model(dtype=dtype, init_weights=init_weights, rank=4, delora_lambda=3)
    ours = ours_model(dtype=dtype, init_weights=init_weights, rank=4, delora_lambda=3)
    assert_same_tensors_as_hf(ours, hf)  # A, B, λ and w; the parameter counts
    assert all(t.dtype == torch.float32 for t in trainable_tensors(ours).values())
    inputs = batch("llama")
    with torch.no_grad():
        result, expected = ours(**inputs), hf(**inputs)
        base = build("llama").to(dtype)(**inputs).logits
    assert torch.equal(result.logits, expected.logits) and torch.equal(result.loss, expected.loss)
    assert torch.equal(result.logits, base) is init_weights  # B = 0 leaves the model as it was


def test_default_targets_are_hf_peft_s() -> None:
    hf, ours = hf_model(target_modules=None), ours_model(target_modules=())
    assert sorted(trainable_tensors(ours)) == sorted(trainable_tensors(hf))
    assert all(".q_proj." in n or ".v_proj." in n for n in trainable_tensors(ours))


def test_gradients_equal_hf() -> None:
    hf, ours = hf_model(), ours_model()
    copy_hf_tensors(hf, ours)
    assert_gradients_match_hf(hf, ours, batch("llama"), "delora_")


def test_module_dropout_drops_the_adapter_input_as_in_hf() -> None:
    hf, ours = hf_model(module_dropout=0.3), ours_model(module_dropout=0.3)
    copy_hf_tensors(hf, ours)
    hf.train()
    ours.train()
    inputs = batch("llama")
    losses = []
    for model in (hf, ours):
        torch.manual_seed(7)  # the same masks, drawn in the same order
        losses.append(model(**inputs).loss)
        losses[-1].backward()
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    mine = trainable_tensors(ours)
    for name, tensor in trainable_tensors(hf).items():
        assert torch.allclose(mine[name].grad, tensor.grad, atol=1e-6), name
    with torch.no_grad():
        torch.manual_seed(8)
        dropped = ours(**inputs).loss
        ours.eval()
        assert not torch.allclose(dropped, ours(**inputs).loss)  # training drops; evaluation does not


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6}, "lambda_pattern": {"q_proj": 4.5},
               "rank": 3}),
    ("llama", {"init_weights": False, "layers": [1], "layers_pattern": "layers", "module_dropout": 0.1}),
    ("opt", {"bias": "all", "target_modules": ["q_proj", "v_proj"]}),
    ("opt", {"bias": "delora_only", "target_modules": ["q_proj", "fc2"], "delora_lambda": 0.5}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    assert_same_tensors_as_hf(ours, hf)  # the patterns' ranks and λ, the layers, the trained biases
    if "lambda_pattern" in fields:
        assert {layer.delora_lambda["default"].detach().item() for n, layer in ours.named_modules()
                if isinstance(layer, DeLoRALayer) and n.endswith("q_proj")} == {4.5}
    copy_hf_tensors(hf, ours)  # trained biases too: they must travel with the file
    # rank_pattern, lambda_pattern, target_modules and layers_to_transform as given in HF PEFT; peftkit names the exact
    # modules (the tensor keys show that both select the same).
    assert_files_match_hf(hf, ours, arch, batch(arch), tmp_path, loose=(
        "target_modules", "rank_pattern", "lambda_pattern", "layers_to_transform", "layers_pattern"))
    if "rank_pattern" in fields:  # each library reads the other's patterns
        for path in (tmp_path / "hf", tmp_path / "pk"):
            layers = pk.load_adapter(build(arch), path).model.layers
            assert [layers[i].mlp.down_proj.delora_A["default"].shape[0] for i in (0, 1)] == [3, 6]
            assert layers[1].self_attn.v_proj.delora_B["default"].shape == (16, 2)


def test_a_file_keeps_its_weight_norms_on_another_base(tmp_path: Path) -> None:
    """w is saved with the adapter: loaded onto other base weights, both libraries use the file's."""
    hf, ours = hf_model(init_weights=False), ours_model(init_weights=False)
    hf.save_pretrained(str(tmp_path))
    other = build("llama", seed=5)
    theirs = peft.PeftModel.from_pretrained(build("llama", seed=5), str(tmp_path)).eval()
    mine = pk.load_adapter(other, tmp_path)
    w = mine.model.layers[0].self_attn.q_proj.delora_w_norm["default"]
    assert torch.equal(w, ours.model.layers[0].self_attn.q_proj.delora_w_norm["default"])
    assert not torch.allclose(w, other.model.layers[0].self_attn.q_proj.base_layer.weight.norm(dim=0))
    inputs = batch("llama")
    with torch.no_grad():
        assert torch.equal(mine(**inputs).logits, theirs(**inputs).logits)


def test_merge_unmerge_and_unload_equal_hf() -> None:
    hf, ours = hf_model(), ours_model()
    copy_hf_tensors(hf, ours)
    assert_merges_as_hf(hf, ours, batch("llama"), DeLoRALayer)


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    hf, ours = hf_model(), ours_model()
    other: dict[str, Any] = {"rank": 2, "delora_lambda": 5, "init_weights": False,
                             "target_modules": ["v_proj", "o_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.DeloraConfig(task_type="CAUSAL_LM", r=2, delora_lambda=5, init_weights=False,
                                              target_modules=["v_proj", "o_proj"]))
    torch.manual_seed(4)
    pk.apply(ours, pk.DeLoRA(**other), name="other")
    copy_hf_tensors(hf, ours)
    check_two_adapters_as_hf(hf, ours)
    pk.delete_adapter(ours, "other")
    attention = ours.model.layers[0].self_attn
    assert not isinstance(attention.o_proj, DeLoRALayer) and isinstance(attention.v_proj, DeLoRALayer)
    assert list(attention.v_proj.delora_A) == ["default"] and "other" not in attention.v_proj.delora_w_norm
    assert not any(k.endswith("w_norm.other") for k in ours.state_dict())


def test_unsupported_layers_are_refused_as_in_hf() -> None:
    # HF PEFT 0.21.2's DeLoRA adapts nn.Linear alone: GPT-2's Conv1D (its own default target there, c_attn, too),
    # embeddings and others raise TypeError in it.
    for targets in (["c_attn"], None):
        with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
            peft.get_peft_model(build("gpt2"), peft.DeloraConfig(target_modules=targets))
        model = build("gpt2")
        with pytest.raises(UnsupportedLayerError, match="only modules of type Conv1D.*supported layer types: Linear"):
            pk.apply(model, pk.DeLoRA(target_modules=targets or ()))
        assert not any(isinstance(m, DeLoRALayer) for m in model.modules())
    with pytest.raises(UnsupportedLayerError, match="DeLoRA cannot adapt a Embedding; it adapts nn.Linear only"):
        DeLoRALayer(nn.Embedding(4, 8))


def test_errors_name_the_field_and_leave_the_model_unchanged() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"rank": 4.0}, "rank=4.0 must be an integer >= 1"),
        ({"rank_pattern": {"v_proj": -1}}, r"rank_pattern\['v_proj'\]=-1 must be an integer >= 1"),
        ({"delora_lambda": float("nan")}, "delora_lambda=nan must be a finite number"),
        ({"delora_lambda": True}, "delora_lambda=True must be a finite number"),
        ({"lambda_pattern": {"q_proj": "big"}}, r"lambda_pattern\['q_proj'\]='big' must be a finite number"),
        ({"module_dropout": 1.0}, r"module_dropout=1.0 must be in \[0, 1\)"),
        ({"init_weights": "yes"}, "init_weights='yes' must be True or False"),
        ({"bias": "lora_only"}, "bias='lora_only' must be one of"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            pk.DeLoRA(**fields)
    model = build("llama")
    for fields, message in [({"rank_pattern": {"v_prj": 2}}, "rank_pattern key 'v_prj' matches no module"),
                            ({"lambda_pattern": {"q_prj": 2}}, "lambda_pattern key 'q_prj' matches no module")]:
        with pytest.raises(ConfigError, match=message):
            pk.apply(model, pk.DeLoRA(**{**FIELDS, **fields}))
        assert not any(isinstance(m, DeLoRALayer) for m in model.modules())
    with pytest.raises(ConfigError, match="sets use_magic=1, an option of HF PEFT's DeLoRA that peftkit does not"):
        pk.DeLoRA.from_hf_dict({"peft_type": "DELORA", "target_modules": ["q_proj"], "use_magic": 1}, ["q_proj"])
    assert getattr(pk, str(PEFT_METHODS["delora"])) is pk.DeLoRA
