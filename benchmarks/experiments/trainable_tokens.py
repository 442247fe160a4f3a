"""Trainable tokens on a large vocabulary: peftkit against HF PEFT, one training step each.

A Llama-architecture model with Llama-3's vocabulary (128,256 tokens), hidden 512, 2 layers, tied input and
output embeddings, fp32, batch 4 × 256, 2 threads; 16 trainable tokens. HF PEFT copies the whole embedding table
(vocabulary × hidden) with the trained rows in place in every forward, for the input embedding and again for the
tied output layer; peftkit replaces only the looked-up rows and computes only the trained tokens' logit columns.
Both variants timed interleaved in the same run; the figure is a ratio of medians::

    .venv/bin/python benchmarks/experiments/trainable_tokens.py [--quick] [--out results/trainable_tokens.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, median, report, round_robin, timing_args  # noqa: E402

TOKENS = list(range(128_000, 128_016))  # e.g. a chat template's new special tokens


def make(name: str, vocab: int, hidden: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    tokens = [t % vocab for t in TOKENS]
    if name == "hf":
        from peft import TrainableTokensConfig, get_peft_model

        return get_peft_model(model, TrainableTokensConfig(token_indices=tokens)).train()
    import peftkit as pk

    return pk.apply(model, pk.TrainableTokens(token_indices=tokens)).train()


def step(model: nn.Module, ids: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    model(input_ids=ids, labels=ids).loss.backward()


def main() -> None:
    args = timing_args(__doc__, rounds=7, quick="a small vocabulary for a smoke run")
    vocab, hidden, batch, seq = (1_000, 64, 2, 32) if args.quick else (128_256, 512, 4, 256)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids[:, ::8] = TOKENS[0] % vocab  # the trained tokens occur in the batch
    models = {name: make(name, vocab, hidden) for name in ("pk", "hf")}
    times = round_robin({name: (lambda m=m: step(m, ids)) for name, m in models.items()}, rounds=args.rounds,
                        warmup=2)
    medians = {k: median(v) for k, v in times.items()}
    result = {
        "experiment": "trainable_tokens", "vocab": vocab, "hidden": hidden, "batch": [batch, seq],
        "tokens": len(TOKENS), "rounds": args.rounds, "median_step_s": medians,
        "ratios": {"pk / hf": medians["pk"] / medians["hf"]}, "times_s": times,
        "environment": environment(),
    }
    report(medians, result["ratios"], result, args.out)


if __name__ == "__main__":
    main()
