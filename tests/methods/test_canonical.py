"""Canonical LoRA: the seed's tied-weight equivalence, fused part layouts, HF PEFT export of fused adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import ConfigError
from peftkit.methods.canonical import CanonicalLoRALinear
from peftkit.methods.grouped import SharedDown, groups_of
from peftkit.methods.roles import fused_layout

from models import build

IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))


def tiny(kind: str, **overrides: object) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "phi3":
        cfg = tf.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, pad_token_id=0)
        return tf.Phi3ForCausalLM(cfg).eval()
    if kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=96)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if kind == "falcon":
        cfg = tf.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=96, **overrides)
        return tf.FalconForCausalLM(cfg).eval()
    return build(kind)


def _b_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradient of every B, as rows of the (fused or separate) projection output."""
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, CanonicalLoRALinear) and module.is_canonical("default"):
            pieces = [module.lora_B["default"][p].weight.grad for p in module.layout]
            grads[name] = module._to_fused([g.T for g in pieces]).T
        elif hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            grads[name] = module.lora_B["default"].weight.grad
    return grads


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3", "gpt_neox"])
def test_performant_equals_canonical_with_tied_A(kind: str) -> None:
    """Seed 000: [B_q B_k B_v] A x = [B_q A x, B_k A x, B_v A x]: same outputs, same gradients on B."""
    performant = tiny(kind)
    pk.apply(performant, pk.LoRA(target_modules=["linear_qkv", "linear_fc1", "linear_proj"], rank=4, alpha=8,
                                 init_B="gaussian"))
    canonical = copy.deepcopy(performant)
    pk.convert(canonical, to="canonical")
    assert isinstance(get_state(canonical).configs["default"], pk.CanonicalLoRA)

    out_p, out_c = performant(IDS).logits, canonical(IDS).logits
    torch.testing.assert_close(out_c, out_p, rtol=1e-6, atol=1e-6)
    out_p.square().mean().backward()
    out_c.square().mean().backward()
    grads_p, grads_c = _b_grads(performant), _b_grads(canonical)
    assert grads_p.keys() == grads_c.keys() and grads_p
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-7)


def test_llama_linear_qkv_shares_one_A_and_one_dropout_mask() -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, dropout=0.5, init_B="gaussian"))
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.lora_A["default"]
    assert isinstance(shared, SharedDown) and shared is attn.k_proj.lora_A["default"] is attn.v_proj.lora_A["default"]
    assert groups_of(model, "default") == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in (0, 1)]
    trainable, _ = pk.count_parameters(model)
    assert trainable == 2 * (4 * 32 + 4 * (32 + 16 + 16))  # one A per layer, B rows per projection
    calls = []
    shared.dropout.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    model(IDS)
    assert len(calls) == 1  # one dropout (and one A matmul) for q, k and v


def test_canonical_part_roles_on_fused_gpt2() -> None:
    model = build("gpt2")
    pk.apply(model, pk.CanonicalLoRA(target_modules=["linear_q", "linear_v"], rank=2, init_B="gaussian"))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, CanonicalLoRALinear) and list(layer.lora_A["default"]) == ["q", "v"]
    delta = layer.delta_weight("default")  # (out, in) = (96, 32): the k rows stay untouched
    assert delta[32:64].abs().max() == 0 and delta[:32].abs().max() > 0 and delta[64:].abs().max() > 0


def test_canonical_partial_save_and_load_round_trip(tmp_path) -> None:
    model = build("gpt2")
    pk.apply(model, pk.CanonicalLoRA(target_modules=["linear_q", "linear_v", "linear_fc2"], rank=2,
                                     init_B="gaussian"))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(build("gpt2"), tmp_path)
    assert list(loaded.transformer.h[1].attn.c_attn.lora_A["default"]) == ["q", "v"]
    torch.testing.assert_close(loaded(IDS).logits, reference, rtol=0, atol=1e-6)


def test_performant_lora_refuses_a_part_of_a_fused_layer() -> None:
    with pytest.raises(ConfigError, match="CanonicalLoRA"):
        pk.apply(build("gpt2"), pk.LoRA(target_modules=["linear_q"]))


def _split_rows(kind: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Which output rows the model itself reads as q, k and v (its own split code on an arange)."""
    if kind == "falcon":
        attn = model.transformer.h[0].self_attention
        y = torch.arange(attn.query_key_value.out_features, dtype=torch.float32)[None, None]
        q, k, v = attn._split_heads(y)
        return {"q": q.flatten(), "k": k[..., : attn.head_dim].flatten() if attn.new_decoder_architecture
                else k.flatten(), "v": v.flatten()}
    cfg = model.config  # GPT-NeoX: qkv.view(..., heads, 3 * head_dim).chunk(3, dim=-1)
    d = cfg.hidden_size // cfg.num_attention_heads
    y = torch.arange(3 * cfg.hidden_size, dtype=torch.float32).view(-1, 3 * d)
    return dict(zip("qkv", (t.flatten() for t in y.chunk(3, dim=-1)), strict=True))


@pytest.mark.parametrize(("kind", "overrides"), [
    ("gpt_neox", {}),
    ("falcon", {"new_decoder_architecture": False, "multi_query": False}),
    ("falcon", {"new_decoder_architecture": False, "multi_query": True}),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
])
def test_interleaved_layouts_match_the_models_split(kind: str, overrides: dict) -> None:
    model = tiny(kind, **overrides)
    name = next(n for n, _ in model.named_modules() if n.endswith("query_key_value"))
    layout = fused_layout(model, name, model.get_submodule(name).out_features)
    expected = _split_rows(kind, model)
    for part in "qkv":
        rows = layout[part]
        if kind == "falcon" and overrides.get("new_decoder_architecture"):
            # q rows in the model's order; k/v heads are broadcast per query head, so compare as sets
            assert sorted(rows.tolist()) == sorted(set(expected[part].long().tolist())), part
        else:
            assert rows.tolist() == expected[part].long().tolist(), part


def test_phi3_canonical_exports_as_hf_adapter_on_qkv_proj(tmp_path) -> None:
    from peft import PeftModel

    model = tiny("phi3")
    pk.apply(model, pk.CanonicalLoRA(target_modules=["linear_q", "linear_k", "linear_v", "linear_fc1_gate",
                                                     "linear_fc1_up"], rank=2, alpha=4, init_B="gaussian"))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path, layout="performant")
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["gate_up_proj", "qkv_proj"]
    hf = PeftModel.from_pretrained(tiny("phi3"), tmp_path).eval()
    torch.testing.assert_close(hf(IDS).logits, reference, rtol=1e-5, atol=1e-5)
