"""QLoRA end to end on a tiny Llama: training on the 4-bit base, merging, and HF PEFT interop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.quant import Linear4bit, Linear8bit, prepare_for_kbit_training, quantize

from models import train_losses

transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (4, 16), generator=g)


def _train(model: nn.Module, steps: int) -> list[float]:
    ids = _batch()
    return train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=1e-2, steps=steps)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_training_reduces_loss_and_trains_only_adapters(bits: int) -> None:
    model = _llama()
    quantize(model, bits=bits, compute_dtype=torch.float32)
    prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    pk.apply(model, pk.LoRA(target_modules=TARGETS, rank=8, alpha=16))
    kind = Linear4bit if bits == 4 else Linear8bit
    assert sum(isinstance(m, kind) for m in model.modules()) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    losses = _train(model, 15)
    assert losses[-1] < losses[0] - 0.5
    assert all(not b.requires_grad for b in model.buffers())


def test_qlora_with_gradient_checkpointing() -> None:
    model = _llama()
    quantize(model, compute_dtype=torch.float32)
    prepare_for_kbit_training(model)  # HF checkpointing + input grads
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4))
    model.train()
    losses = _train(model, 6)
    assert losses[-1] < losses[0]


def _qlora_model() -> nn.Module:
    model = quantize(_llama(), compute_dtype=torch.float32)
    torch.manual_seed(1)
    return pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, init_B="gaussian"))


def test_merge_into_quantized_base_and_dequantized_unload() -> None:
    ids = _batch()
    model = _qlora_model()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    float_model = _llama()
    with torch.no_grad():
        quantization_noise = (float_model(input_ids=ids).logits - expected).abs().mean()
    pk.merge(model)  # dequantize → add → requantize: a fresh rounding, as large as quantizing itself
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert 0 < (merged - expected).abs().mean() < 2 * quantization_noise

    plain = pk.unload(_qlora_model(), merge=True, dequantize=True)  # merged into float copies
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_reads_the_quantized_base_in_fp32(bits: int, compute_dtype: torch.dtype) -> None:
    """The merged weight is quantize(dequantize_fp32(W) + ΔW): no rounding to the compute dtype on the way, so a
    zero update leaves the weight as it was (NF4: bit for bit; int8: row scales within an fp32 rounding per merge)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40), nn.Linear(40, 24))
    quantize(model, bits=bits, double_quant=False, compute_dtype=compute_dtype, skip=())
    before = [m.dequantize(torch.float32) for m in model]
    codes = [m.qweight.clone() for m in model]
    for method in (pk.LoRA(target_modules=["0", "1"], rank=4),  # B = 0
                   pk.IA3(target_modules=["0", "1"], feedforward_modules=["1"]),  # l = 1
                   pk.AdaLoRA(target_modules=["0", "1"], init_rank=4, target_rank=2, total_step=10)):  # λ = 0
        pk.apply(model, method)
        pk.merge(model)
        pk.unload(model, merge=False)
        for layer, weight, code in zip(model, before, codes, strict=True):
            assert torch.equal(layer.qweight, code), type(method).__name__
            torch.testing.assert_close(layer.dequantize(torch.float32), weight, rtol=1e-6, atol=0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40), nn.Linear(40, 24))
    quantize(model, bits=bits, double_quant=False, compute_dtype=compute_dtype, skip=())
    pk.apply(model, pk.LoRA(target_modules=["0", "1"], rank=4, init_B="gaussian"))
    layer = model[0]
    expected = type(layer.base_layer)(
        layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default").detach(),
        compute_dtype=compute_dtype, **({"double_quant": False} if bits == 4 else {}),
    )
    pk.merge(model)
    torch.testing.assert_close(layer.base_layer.dequantize(torch.float32), expected.dequantize(torch.float32),
                               rtol=0, atol=0)


def test_merge_and_unmerge_log_what_they_did(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = quantize(nn.Sequential(nn.Linear(64, 32)), compute_dtype=torch.float32, skip=())
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=4, init_B="gaussian"))
    with caplog.at_level("INFO", logger="peftkit"):
        pk.merge(model)
        pk.unmerge(model)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("merged adapter 'default' into quantized 0: max abs re-quantization error")
    assert messages[1].startswith("unmerged adapter 'default' from a quantized Linear4bit: max abs re-quantization")


def test_adapter_trained_on_4bit_base_loads_in_hf_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _llama()
    reference = _llama()  # the same weights, unquantized
    quantize(model, compute_dtype=torch.float32)
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4, alpha=8))
    _train(model, 5)
    pk.save_adapter(model, tmp_path / "qlora")
    saved = {p.name for p in (tmp_path / "qlora").iterdir()}
    assert saved == {"adapter_config.json", "adapter_model.safetensors"}

    hf = peft.PeftModel.from_pretrained(reference, tmp_path / "qlora").eval()
    ids = _batch()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = hf(input_ids=ids).logits
    # the only difference is the 4-bit base: close, and much closer than without the adapter
    with torch.no_grad(), hf.disable_adapter():
        base_only = hf(input_ids=ids).logits
    assert (ours - theirs).abs().mean() < 0.1 * theirs.abs().mean()
    assert (ours - theirs).abs().mean() < (ours - base_only).abs().mean()


@pytest.mark.parametrize("quantized", [True, False])
def test_fp32_update_is_rounded_as_in_hf_peft(quantized: bool) -> None:
    """HF PEFT adds an fp32 update to a bf16 float base's output before rounding, but rounds it first on a
    bitsandbytes base."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    if quantized:
        quantize(model, bits=4, compute_dtype=torch.bfloat16)
    else:
        model.to(torch.bfloat16)
    pk.apply(model, pk.LoRA(target_modules=["0"], rank=4, init_B="gaussian"))
    layer = model[0]
    x = torch.randn(16, 64).to(torch.bfloat16)
    with torch.no_grad():
        base = layer.base_layer(x)
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        expected = base + update.to(torch.bfloat16) if quantized else (base + update).to(torch.bfloat16)
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_forward_equals_bitsandbytes_linear4bit_with_hf_peft_lora(
    double_quant: bool, compute_dtype: torch.dtype
) -> None:
    """QLoRA on peftkit's NF4 layer gives bitsandbytes' ``Linear4bit`` + HF PEFT LoRA output bit for bit (same
    float weights, same factors), with and without double quantization (whose 8-bit block constants agree with
    bitsandbytes' on this weight: see test_nf4.py for the rare ones that do not)."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(64, 32))
    linear = ours[0]
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=64)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    reference = nn.Sequential(layer.to("cpu"))  # quantizes the weight
    reference.is_loaded_in_4bit = True  # as from_pretrained marks it: HF PEFT then wraps it in its bnb LoRA layer
    quantize(ours, bits=4, quant_type="nf4", double_quant=double_quant, compute_dtype=compute_dtype)
    pk.apply(ours, pk.LoRA(target_modules=["0"], rank=4, alpha=8, init_B="gaussian"))
    # Training mode, QLoRA's: in eval mode bitsandbytes' CPU backend switches to a faster, less exact 4-bit kernel.
    hf = peft.get_peft_model(reference, peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=8)).train()
    ours.train()
    hf_layer = hf.base_model.model[0]
    assert type(hf_layer) is peft.tuners.lora.bnb.Linear4bit
    with torch.no_grad():
        for factor in ("lora_A", "lora_B"):
            getattr(hf_layer, factor)["default"].weight.copy_(getattr(ours[0], factor)["default"].weight)
    packed = ours[0].base_layer.packed()
    assert torch.equal(packed.data, layer.weight.data.view(-1))
    assert torch.equal(packed.absmax, layer.weight.quant_state.absmax)
    x = torch.randn(5, 64).to(compute_dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x))
