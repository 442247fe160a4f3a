"""LoRA on mixture-of-experts weight stacks (``target_parameters``): peftkit against HF PEFT.

A Mixtral-architecture model from a ``transformers`` config (hidden 512, 4 layers, 8 experts of width 1408, top-2
routing, vocabulary 8000), fp32, batch 4 × 256, 2 threads; LoRA rank 16, alpha 32 on ``experts.gate_up_proj`` and
``experts.down_proj`` (one rank-16 LoRA per expert) and on q/k/v/o. Timed interleaved in the same run: a training
step (forward and backward) and a forward without gradients, for the base model, HF PEFT and peftkit. Both libraries
compute ``W + ΔW`` for the whole stack in each forward (one ``baddbmm``); they differ in how the adapted weight
reaches the module (``torch.func.functional_call`` against HF PEFT's parametrization)::

    .venv/bin/python benchmarks/experiments/moe_experts.py [--quick] [--out results/moe_experts.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, median, report, round_robin, timing_args  # noqa: E402

PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make(name: str, hidden: int, layers: int, inter: int) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg)
    if name == "base":
        return model.requires_grad_(False)
    if name == "hf":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, target_modules=MODULES, target_parameters=PARAMETERS,
                            init_lora_weights=False)
        return get_peft_model(model, config)
    import peftkit as pk

    model = pk.apply(model, pk.LoRA(target_modules=MODULES, target_parameters=PARAMETERS, rank=16, alpha=32))
    with torch.no_grad():  # as HF PEFT's init_lora_weights=False: B is not zero either
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def train_step(model: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    model(inputs_embeds=embeds.clone().requires_grad_(True), labels=ids).loss.backward()


def forward(model: nn.Module, ids: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()


def main() -> None:
    args = timing_args(__doc__, rounds=7)
    hidden, layers, inter, batch, seq = (64, 2, 128, 2, 32) if args.quick else (512, 4, 1408, 4, 256)
    ids = torch.randint(0, 8000, (batch, seq), generator=torch.Generator().manual_seed(1))
    models = {name: make(name, hidden, layers, inter).train() for name in ("base", "hf", "pk")}
    inner = models["base"]
    embeds = inner.get_input_embeddings()(ids).detach()
    fns = {f"train {n}": (lambda m=m: train_step(m, embeds, ids)) for n, m in models.items()}
    fns |= {f"forward {n}": (lambda m=m: forward(m, ids)) for n, m in models.items()}
    times = round_robin(fns, rounds=args.rounds, warmup=2)
    medians = {k: median(v) for k, v in times.items()}
    ratios = {f"{kind} {lib} / base": medians[f"{kind} {lib}"] / medians[f"{kind} base"]
              for kind in ("train", "forward") for lib in ("hf", "pk")}
    ratios |= {f"{kind} pk / hf": medians[f"{kind} pk"] / medians[f"{kind} hf"] for kind in ("train", "forward")}
    result = {
        "experiment": "moe_experts", "hidden": hidden, "layers": layers, "experts": 8, "expert_width": inter,
        "batch": [batch, seq], "rank": 16, "rounds": args.rounds, "median_s": medians, "ratios": ratios,
        "times_s": times, "environment": environment(),
    }
    report(medians, ratios, result, args.out)


if __name__ == "__main__":
    main()
