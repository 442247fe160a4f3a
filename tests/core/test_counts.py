"""The trainable-parameter line, checked against seed 002's table and Llama-2-7B's well-known figures."""

from __future__ import annotations

import pytest
import torch

import peftkit as pk


def flan_t5_small_shape():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                   num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   relative_attention_num_buckets=32, decoder_start_token_id=0)
    cfg.tie_word_embeddings = False  # flan-t5 has its own lm_head; transformers 5 forces tying in __init__
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    # flan-t5-small: encoder and decoder share the input embedding; lm_head is separate.
    model.encoder.embed_tokens.weight = model.decoder.embed_tokens.weight = model.shared.weight
    return model


@pytest.mark.parametrize(
    "rank,line",
    [
        (4, "trainable params: 172,032 || all params: 77,133,184 || trainable%: 0.2230"),
        (8, "trainable params: 344,064 || all params: 77,305,216 || trainable%: 0.4451"),
        (16, "trainable params: 688,128 || all params: 77,649,280 || trainable%: 0.8862"),
        (32, "trainable params: 1,376,256 || all params: 78,337,408 || trainable%: 1.7568"),
    ],
)
def test_seed_002_t5_table(rank: int, line: str) -> None:
    model = flan_t5_small_shape()
    pk.apply(model, pk.LoRA(target_modules=["q", "v"], rank=rank, alpha=2 * rank, dropout=0.05))
    assert pk.trainable_parameters_line(model) == line


def test_llama_2_7b_on_meta(capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=8, alpha=16))
    pk.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    )
    assert all(p.device.type == "meta" for p in model.parameters())


def test_counts_match_hf_peft() -> None:
    peft = pytest.importorskip("peft")
    from models import build

    ours, theirs = build("gpt2"), build("gpt2")
    pk.apply(ours, pk.LoRA(target_modules=["c_attn", "c_proj"], rank=4))
    hf = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    assert pk.count_parameters(ours) == hf.get_nb_trainable_parameters()
