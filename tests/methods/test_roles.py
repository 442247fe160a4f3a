"""Megatron-style role names resolve to each architecture's modules; unknown architectures get a helpful error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import ConfigError
from peftkit.methods.roles import ARCHITECTURES, blocks, role_modules, role_table

from models import build


def _tiny(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "vocab_size": 96}
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=2))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=2))
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small))
    if kind == "falcon":
        return tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    vocab_size=96))
    if kind == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0))
    return build(kind)


def _leaves(model: nn.Module, role: str) -> list[str]:
    """Each resolved module's name from the block onwards (``self_attn.q_proj``), deduplicated, in order."""
    out: list[str] = []
    for name in role_modules(model, role):
        parts = name.split(".")
        idx = next(i for i, p in enumerate(parts) if p.isdigit())
        short = ".".join(parts[idx + 1:])
        if short not in out:
            out.append(short)
    return out


EXPECTED = {
    "llama": {"linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "linear_proj": ["self_attn.o_proj"], "linear_fc1": ["mlp.gate_proj", "mlp.up_proj"],
              "linear_fc1_gate": ["mlp.gate_proj"], "linear_fc1_up": ["mlp.up_proj"], "linear_fc2": ["mlp.down_proj"],
              "linear_k": ["self_attn.k_proj"]},
    "mistral": {"linear_qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]},
    "qwen2": {"linear_fc2": ["mlp.down_proj"]},
    "gpt2": {"linear_qkv": ["attn.c_attn"], "linear_proj": ["attn.c_proj"], "linear_fc1": ["mlp.c_fc"],
             "linear_fc2": ["mlp.c_proj"], "linear_q": ["attn.c_attn"]},
    "gpt_neox": {"linear_qkv": ["attention.query_key_value"], "linear_proj": ["attention.dense"],
                 "linear_fc1": ["mlp.dense_h_to_4h"], "linear_fc2": ["mlp.dense_4h_to_h"]},
    "falcon": {"linear_qkv": ["self_attention.query_key_value"], "linear_proj": ["self_attention.dense"],
               "linear_fc1": ["mlp.dense_h_to_4h"], "linear_fc2": ["mlp.dense_4h_to_h"]},
    "phi3": {"linear_qkv": ["self_attn.qkv_proj"], "linear_v": ["self_attn.qkv_proj"],
             "linear_proj": ["self_attn.o_proj"], "linear_fc1": ["mlp.gate_up_proj"],
             "linear_fc1_up": ["mlp.gate_up_proj"], "linear_fc2": ["mlp.down_proj"]},
    "t5": {"linear_qkv": ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                          "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v"],
           "linear_proj": ["layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"],
           "linear_fc1": ["layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
                          "layer.2.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_1"],
           "linear_fc1_gate": ["layer.1.DenseReluDense.wi_0", "layer.2.DenseReluDense.wi_0"],
           "linear_fc2": ["layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"]},
    "bert": {"linear_qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
             "linear_proj": ["attention.output.dense"], "linear_fc1": ["intermediate.dense"],
             "linear_fc2": ["output.dense"]},
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_role_names_resolve_per_architecture(kind: str) -> None:
    model = _tiny(kind)
    for role, expected in EXPECTED[kind].items():
        assert _leaves(model, role) == expected, role


def test_role_names_work_as_targets_and_inspect() -> None:
    model = build("llama")
    report = pk.inspect(model, pk.LoRA(target_modules=["linear_proj", "linear_fc2"], rank=2))
    assert [r.name.rsplit(".", 1)[-1] for r in report.rows] == ["o_proj", "down_proj"] * 2
    assert role_table(model)["linear_qkv"][:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def test_bert_fc2_is_the_block_output_not_the_attention_output() -> None:
    names = role_modules(build("bert"), "linear_fc2")
    assert names and all(".attention." not in n for n in names)


def test_unknown_architecture_names_supported_ones_and_the_call() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError) as info:
        pk.apply(model, pk.LoRA(target_modules=["linear_qkv"]))
    message = str(info.value)
    assert "llama" in message and "gpt2" in message and "pk.register_architecture(" in message


def test_missing_role_on_known_architecture_lists_its_roles() -> None:
    with pytest.raises(ConfigError, match="linear_fc1_gate.*is not defined for model_type 'gpt2'"):
        pk.apply(build("gpt2"), pk.LoRA(target_modules=["linear_fc1_gate"]))


def test_register_architecture_in_one_call() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq, self.wo = nn.Linear(4, 4), nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "toynet"})()
            self.blocks = nn.ModuleList([Block(), Block()])

    try:
        pk.register_architecture("toynet", roles={"linear_qkv": ["wq"], "linear_proj": ["wo"]})
        model = pk.apply(Net(), pk.LoRA(target_modules=["linear_proj"]))
        assert [n for n, _ in model.named_modules() if n.endswith("wo")] == ["blocks.0.wo", "blocks.1.wo"]
        assert type(model.blocks[0].wo).__name__ == "LoRALinear" and isinstance(model.blocks[0].wq, nn.Linear)
        with pytest.raises(ConfigError, match="unknown role names"):
            pk.register_architecture("toynet", roles={"linear_qkvo": ["wq"]})
    finally:
        ARCHITECTURES.pop("toynet", None)


def test_blocks_layouts() -> None:
    contiguous = blocks(1, [("q", 4), ("k", 2), ("v", 2)])
    assert contiguous["k"].tolist() == [4, 5] and contiguous["v"].tolist() == [6, 7]
    per_head = blocks(2, [("q", 2), ("k", 2), ("v", 2)])  # [q0 k0 v0 | q1 k1 v1], head_dim 2
    assert per_head["q"].tolist() == [0, 1, 6, 7] and per_head["v"].tolist() == [4, 5, 10, 11]
