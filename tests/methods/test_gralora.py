"""GraLoRA against HF PEFT: the block-granular update, initialisation, forward, dropout, gradients, files both ways,
merging, several adapters and errors, on a tiny Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_prompt import batch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError, UnsupportedLayerError
from peftkit.methods.gralora import GraLoRALayer, granular, granular_delta
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_match_hf,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    build,
    check_two_adapters_as_hf,
    randomize_trainable,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
#: HF PEFT's names of peftkit's fields.
HF_NAMES = {"rank": "r", "hybrid_rank": "hybrid_r", "dropout": "gralora_dropout", "layers": "layers_to_transform"}


def hf_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    fields = {"rank": 4, "alpha": 8, "target_modules": TARGETS[arch], **fields}
    config = peft.GraloraConfig(task_type="CAUSAL_LM", **{HF_NAMES.get(k, k): v for k, v in fields.items()})
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config).eval()


def ours_model(arch: str = "llama", seed: int = 3, dtype: torch.dtype = torch.float32, **fields: Any) -> Any:
    base = build(arch).to(dtype)
    torch.manual_seed(seed)
    return pk.apply(base, pk.GraLoRA(**{"rank": 4, "alpha": 8, "target_modules": TARGETS[arch], **fields}))


def test_the_update_is_one_low_rank_product_per_block_written_out() -> None:
    torch.manual_seed(0)
    k, rank, sub = 3, 6, 6 // 3
    layer = GraLoRALayer(nn.Linear(12, 9))
    layer.add("default", rank, 2, k, alpha=5.0, dropout=0.0, init_weights=False)
    layer.set_active(["default"])
    A, B = layer.gralora_A["default"].detach(), layer.gralora_B["default"].detach()
    assert A.shape == (k, 4, rank) and B.shape == (k, rank, 3)
    expected = torch.zeros(9, 12)
    for j in range(k):  # block (j, n): input slice n reaches output slice j through its own rank-r/k pair
        for n in range(k):
            pair_a = A[n][:, j * sub:(j + 1) * sub]  # (in/k, r/k)
            pair_b = B[j][n * sub:(n + 1) * sub]  # (r/k, out/k)
            expected[j * 3:(j + 1) * 3, n * 4:(n + 1) * 4] = (pair_a @ pair_b).T
    assert torch.allclose(granular_delta(A, B), expected, atol=1e-6)
    hybrid = layer.gralora_B_general["default"].weight @ layer.gralora_A_general["default"].weight
    scale = 5.0 / (rank + 2)
    assert torch.allclose(layer.delta_weight("default"), scale * (expected + hybrid.detach()), atol=1e-6)
    # Any number of leading dimensions (HF PEFT 0.21.2 takes 2-D and 3-D inputs only).
    for shape in [(12,), (5, 12), (2, 5, 12), (2, 3, 5, 12)]:
        x = torch.randn(shape)
        assert torch.allclose(granular(x, A, B), x @ expected.T, atol=1e-5)
        assert torch.allclose(layer(x), layer.base_layer(x) + x @ layer.delta_weight("default").T, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_initialisation_and_forward_equal_hf(arch: str, init_weights: bool, hybrid_rank: int) -> None:
    fields = {"init_weights": init_weights, "hybrid_rank": hybrid_rank}
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    want, got = trainable_tensors(hf), trainable_tensors(ours)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # the same draws from the global generator, in the same order
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    inputs = batch(arch)
    with torch.no_grad():
        expected, result = hf(**inputs), ours(**inputs)
        base = build(arch)(**inputs).logits
    assert torch.equal(result.logits, expected.logits)
    assert torch.equal(result.logits, base) is init_weights  # B = 0 leaves the model as it was
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_targets_and_half_precision_base_as_in_hf(arch: str) -> None:
    """Without target_modules: LoRA's. Over a bf16 base the tensors are drawn, rounded to bf16 and kept in fp32, and
    each update is rounded to bf16 before it is scaled, as HF PEFT does: the same logits bit for bit."""
    fields = {"init_weights": False, "hybrid_rank": 2}
    hf = hf_model(arch, dtype=torch.bfloat16, target_modules=None, **fields)
    ours = ours_model(arch, dtype=torch.bfloat16, target_modules=(), **fields)
    got = trainable_tensors(ours)
    assert sorted(got) == sorted(trainable_tensors(hf))
    for name, tensor in trainable_tensors(hf).items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    with torch.no_grad():
        ids = batch(arch)["input_ids"]
        assert torch.equal(ours(input_ids=ids).logits, hf(input_ids=ids).logits)


@pytest.mark.parametrize("hybrid_rank", [0, 2])
def test_gradients_equal_hf(hybrid_rank: int) -> None:
    hf, ours = hf_model(hybrid_rank=hybrid_rank), ours_model(hybrid_rank=hybrid_rank)
    randomize_trainable(hf, 0.3, seed=1)
    randomize_trainable(ours, 0.3, seed=1)
    assert_gradients_match_hf(hf, ours, batch("llama"), "gralora_")


def test_dropout_masks_are_drawn_as_in_hf() -> None:
    """In training, the granular and the hybrid part each draw their own dropout mask, in HF PEFT's order."""
    fields = {"dropout": 0.3, "hybrid_rank": 2, "init_weights": False}
    hf, ours = hf_model(**fields).train(), ours_model(**fields).train()
    inputs = batch("llama")
    torch.manual_seed(7)
    want = hf(**inputs).logits
    torch.manual_seed(7)
    assert torch.allclose(ours(**inputs).logits, want, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(**inputs).logits, want, atol=1e-3)


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"hybrid_rank": 2, "gralora_k": 4, "rank": 8, "dropout": 0.1}),
    ("llama", {"layers": [1], "layers_pattern": "layers"}),
    ("gpt2", {"bias": "all", "hybrid_rank": 1}),
    ("gpt2", {"bias": "gralora_only", "target_modules": ["c_attn", "mlp.c_proj"]}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    randomize_trainable(hf, 0.2, seed=2, shift=True)  # trained biases too: they must travel with the file
    randomize_trainable(ours, 0.2, seed=2, shift=True)
    # target_modules and layers_to_transform as given in HF PEFT; peftkit names the exact modules (the tensor keys
    # show that both select the same).
    assert_files_match_hf(hf, ours, arch, batch(arch), tmp_path, loose=("target_modules", "layers_to_transform",
                                                                        "layers_pattern"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch, hybrid_rank=2, init_weights=False), ours_model(arch, hybrid_rank=2, init_weights=False)
    assert_merges_as_hf(hf, ours, batch(arch), GraLoRALayer, arch)


def test_several_adapters_disable_and_delete_as_in_hf() -> None:
    hf, ours = hf_model(init_weights=False), ours_model(init_weights=False)
    other: dict[str, Any] = {"rank": 8, "gralora_k": 4, "hybrid_rank": 1, "alpha": 3, "init_weights": False,
                             "target_modules": ["v_proj", "o_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.GraloraConfig(task_type="CAUSAL_LM", **{HF_NAMES.get(k, k): v
                                                                          for k, v in other.items()}))
    torch.manual_seed(4)
    pk.apply(ours, pk.GraLoRA(**other), name="other")
    check_two_adapters_as_hf(hf, ours)
    pk.delete_adapter(ours, "other")
    attention = ours.model.layers[0].self_attn
    assert not isinstance(attention.o_proj, GraLoRALayer) and isinstance(attention.v_proj, GraLoRALayer)
    assert list(attention.v_proj.gralora_A) == ["default"] and not attention.v_proj.gralora_A_general


def test_unsupported_layers_are_refused_as_in_hf() -> None:
    with pytest.raises(TypeError, match="is not supported"):
        peft.get_peft_model(build("llama"), peft.GraloraConfig(r=4, target_modules=["embed_tokens"]))
    model = build("llama")
    with pytest.raises(UnsupportedLayerError, match="embed_tokens.*Conv1D, Linear"):
        pk.apply(model, pk.GraLoRA(rank=4, target_modules=["embed_tokens"]))
    assert not any(isinstance(m, GraLoRALayer) for m in model.modules())
    with pytest.raises(UnsupportedLayerError, match="GraLoRA cannot adapt a Conv2d; it adapts nn.Linear and GPT-2's"):
        GraLoRALayer(nn.Conv2d(4, 4, 1))
    quantized = pk.quantize(build("llama"), bits=4, quant_type="nf4")  # HF PEFT has no quantized GraLoRA layer
    with pytest.raises(UnsupportedLayerError, match="only modules of type Linear4bit.*supported layer types: Conv1D, "
                                                    "Linear"):
        pk.apply(quantized, pk.GraLoRA(rank=4, target_modules=["q_proj"]))


def test_errors_name_the_field_and_leave_the_model_unchanged() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank": 0}, "rank=0 must be an integer >= 1"),
        ({"rank": 6, "gralora_k": 4}, "rank=6 must be a multiple of gralora_k=4 .* e.g. rank=4"),
        ({"gralora_k": 0}, "gralora_k=0 must be an integer >= 1"),
        ({"hybrid_rank": -1}, "hybrid_rank=-1 must be an integer >= 0"),
        ({"alpha": float("nan")}, "alpha=nan must be a finite number"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' must be True or False"),
        ({"bias": "lora_only"}, "bias='lora_only' must be one of"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            pk.GraLoRA(**fields)
    model = build("llama")
    # k = 3 divides the rank but not q_proj's 32 features: refused before any layer is wrapped.
    with pytest.raises(ConfigError, match=r"gralora_k=3 must divide the input size 32 and output size 32 of "
                                          r"model.layers.0.self_attn.q_proj; .* rank=6 \(here: \[1, 2\]\)"):
        pk.apply(model, pk.GraLoRA(rank=6, gralora_k=3))
    assert not any(isinstance(m, GraLoRALayer) for m in model.modules())
    with pytest.raises(ValueError, match="in_features should be divisible by gralora_k"):
        peft.get_peft_model(build("llama"), peft.GraloraConfig(r=6, gralora_k=3))  # HF PEFT raises while wrapping
    with pytest.raises(ConfigError, match="adapter_config.json sets use_dora=True, an option of HF PEFT's GraLoRA"):
        pk.GraLoRA.from_hf_dict({"peft_type": "GRALORA", "r": 4, "use_dora": True}, [])
    assert getattr(pk, str(PEFT_METHODS["gralora"])) is pk.GraLoRA


def test_inputs_of_more_than_three_dimensions_where_hf_fails() -> None:
    """HF PEFT 0.21.2 unpacks the input as (batch, length, features) and fails on 4-D inputs; peftkit takes any."""
    hf_layer = hf_model(init_weights=False).base_model.model.model.layers[0].self_attn.q_proj
    layer = ours_model(init_weights=False).model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 5, 32)
    with pytest.raises(ValueError, match="too many values to unpack"):
        hf_layer(x)
    with torch.no_grad():
        flat = hf_layer(x.reshape(6, 5, 32)).reshape(2, 3, 5, -1)
        assert torch.allclose(layer(x), flat, atol=1e-6)
