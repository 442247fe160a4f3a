"""Training parity with HF PEFT: the same tiny model adapted by both libraries from the same starting tensors, trained
a few steps with the same optimizer on the same batches, gives the same losses, gradients, evaluation logits and
saved files.

``tests/io/test_hf_differential.py`` compares forward outputs and files; this net compares what only training shows:
gradients through the fast paths (custom autograd functions, sibling groups, cached DoRA norms), and caches that must
follow every optimizer step, including those of ``AdamW(fused=True)`` (``transformers.Trainer``'s default), which
writes parameters without moving their version counters. peftkit runs in its default mode: groups form over the
first two calls of a run, for inputs of at least ``lora_groups.MIN_TOKENS`` tokens (cases with short inputs lower it
to 1, as tests/perf do), so that both the per-layer and the grouped nodes train.

Dropout: the base models' own is set to 0. LoHa's and LoKr's rank and module dropout and AdaLoRA's, VeRA's and
RandLoRA's dropout draw from the global generator as HF PEFT does, so those cases train with dropout, seeded alike.
LoRA's and DoRA's masks are drawn otherwise (from raw random bits, shared by sibling projections; DoRA drops out the
adapter branch only: README, Performance), so LoRA and DoRA train here at dropout 0, or with dropout in evaluation
mode.

Each case: HF PEFT adapts one copy of the model (``get_peft_model``), its trainable tensors are moved off their
initial values (a zero B, unit IA3 vectors or untouched embedding rows would hide most bugs), and peftkit gets the
same tensors, either copied parameter by parameter onto ``pk.apply``'s adapter or through HF PEFT's saved initial
adapter (``pk.load_adapter(trainable=True)``). Both train with one optimizer class over corresponding parameters in
the same order; every base-model dropout is set to 0 and the random generator is seeded alike before every call.

Beyond the plain run (fused AdamW, three steps, evaluation before and after every step): foreach AdamW and SGD,
gradient accumulation, bf16 autocast, a bf16 base, activation checkpointing (both forms), merging and unmerging
after training, adapters loaded from HF PEFT's file for training by both libraries, adapters partly frozen, two
adapters trained together or in turn, deep copies of a trained model, ``transformers.Trainer``, and loops that also
evaluate under ``inference_mode``, run reference and old-policy forwards without gradients, pad, vary the length,
keep gradients between steps, or train in evaluation mode. Where peftkit deliberately differs (README), the tests
assert what it does instead: AdaLoRA's penalty in training mode only, and its rank count kept constant on a
half-precision base; LoHa's CP-form gradients; a DoRA adapter computed from the base output whatever the order of
the active adapters.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.methods import lora_groups

import models

peft = pytest.importorskip("peft")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt_neox": "CAUSAL_LM", "phi3": "CAUSAL_LM", "gemma": "CAUSAL_LM",
        "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "convnet": None}


# ---------------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One adapter spelled for both libraries, on one architecture."""

    arch: str
    hf: Callable[[], Any]
    pk: Callable[[], pk.AdapterConfig]
    #: ``"copy"``: ``pk.apply`` and copy HF PEFT's perturbed tensors in; ``"load"``: load HF PEFT's saved adapter;
    #: ``"resume"``: both libraries load HF PEFT's saved adapter for training (``is_trainable=True``).
    init: str = "copy"
    #: More adapters (name, HF PEFT config, peftkit config), all active and trained together with ``default``.
    extra: tuple[tuple[str, Callable[[], Any], Callable[[], pk.AdapterConfig]], ...] = ()
    #: Sequence length of the batches (2 rows each); below 16 the group threshold is lowered to 1 token.
    seq: int = 20
    adalora: bool = False


def _lora(arch: str, targets: list[str] | str, init: str = "copy", seq: int = 20, **kw: Any) -> Case:
    """A LoRA/DoRA case from HF PEFT's keywords (peftkit's spelled from them)."""
    hf_kw = {"task_type": TASK[arch], "target_modules": targets, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "fan_in_fan_out": arch == "gpt2"} | kw
    names = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "layers_to_transform": "layers",
             "trainable_token_indices": "trainable_token_indices"}
    pk_kw = {names.get(k, k): v for k, v in hf_kw.items() if k not in ("fan_in_fan_out", "use_dora")}
    if pk_kw["task_type"] is None:
        del pk_kw["task_type"]
    dora = kw.get("use_dora", False)
    # (copies: HF PEFT adds a classifier's heads to the lists it is given)
    return Case(arch, lambda: peft.LoraConfig(**copy.deepcopy(hf_kw)),
                lambda: (pk.DoRA if dora else pk.LoRA)(**copy.deepcopy(pk_kw)), init=init, seq=seq)


def _adalora(arch: str, targets: list[str], **kw: Any) -> Case:
    common = {"tinit": 1, "tfinal": 1, "deltaT": 1, "total_step": 5} | kw
    return Case(arch, lambda: peft.AdaLoraConfig(task_type=TASK[arch], target_modules=targets, init_r=4, target_r=2,
                                                 lora_alpha=8, fan_in_fan_out=arch == "gpt2", **common),
                lambda: pk.AdaLoRA(task_type=TASK[arch], target_modules=targets, init_rank=4, target_rank=2,
                                   alpha=8, **common), adalora=True)


CASES: dict[str, Case] = {
    # LoRA
    "lora-llama-qv-short": _lora("llama", ["q_proj", "v_proj"], seq=7),
    "lora-llama-all-linear": _lora("llama", "all-linear"),
    "lora-llama-all-linear-short": _lora("llama", "all-linear", seq=7),
    "lora-llama-loaded": _lora("llama", LLAMA_ALL, init="load"),
    "lora-llama-rslora-patterns": _lora("llama", LLAMA_ALL, use_rslora=True, rank_pattern={"k_proj": 2},
                                        alpha_pattern={"up_proj": 3}),
    "lora-qwen2-lora_bias": _lora("qwen2", ["q_proj", "k_proj", "v_proj"], lora_bias=True),
    "lora-qwen2-bias-all": _lora("qwen2", ["q_proj", "v_proj"], bias="all"),
    "lora-qwen2-bias-lora_only": _lora("qwen2", ["q_proj", "k_proj", "v_proj"], bias="lora_only"),
    "lora-llama-norm-saved": _lora("llama", ["q_proj", "v_proj"], modules_to_save=["model.norm"]),
    "lora-llama-layers": _lora("llama", ["q_proj", "k_proj", "v_proj"], layers_to_transform=[1],
                               layers_pattern="layers"),
    "lora-llama-embedding": _lora("llama", ["embed_tokens", "q_proj", "v_proj"]),
    "lora-llama-tokens": _lora("llama", ["q_proj", "v_proj"], trainable_token_indices=[3, 5, 11]),
    "lora-gpt2-conv1d": _lora("gpt2", ["c_attn", "c_proj", "c_fc"]),
    "lora-gpt2-tied-tokens": _lora("gpt2", ["c_attn"], trainable_token_indices={"wte": [3, 5, 11]}),
    "lora-gpt_neox-fused": _lora("gpt_neox", ["query_key_value", "dense_h_to_4h"]),
    "lora-bert-classifier": _lora("bert", ["query", "value"], modules_to_save=["classifier"]),
    "lora-t5": _lora("t5", ["shared", "q", "k", "v", "wi_0"]),
    "lora-phi3-fused": _lora("phi3", ["qkv_proj", "gate_up_proj", "down_proj"]),
    "lora-gemma-tied-embedding": _lora("gemma", ["embed_tokens", "q_proj", "k_proj"]),
    "lora-convnet": _lora("convnet", ["embed", "conv1", "conv2", "proj"]),
    # a DoRA adapter and a LoRA adapter active together, sharing q_proj and k_proj (the order matters to HF PEFT:
    # see test_dora_beside_an_earlier_lora_adapter)
    "dora-lora-llama-two-adapters": Case(
        "llama", lambda: peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj"], r=2,
                                         lora_alpha=2, use_dora=True),
        lambda: pk.DoRA(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj"], rank=2, alpha=2),
        extra=(("other", lambda: peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4,
                                                 lora_alpha=8),
                lambda: pk.LoRA(task_type="CAUSAL_LM", target_modules="all-linear", rank=4, alpha=8)),)),
    # DoRA
    "dora-llama-all-linear": _lora("llama", "all-linear", use_dora=True),
    "dora-llama-all-linear-short": _lora("llama", "all-linear", use_dora=True, seq=7),
    "dora-llama-loaded": _lora("llama", LLAMA_ALL, init="load", use_dora=True),
    "dora-llama-embedding": _lora("llama", ["embed_tokens", "q_proj", "k_proj"], use_dora=True),
    "dora-phi3-fused": _lora("phi3", ["qkv_proj", "gate_up_proj"], use_dora=True),
    "dora-gpt2-conv1d": _lora("gpt2", ["c_attn", "c_fc"], use_dora=True),
    "dora-convnet": _lora("convnet", ["conv1", "conv2", "proj"], use_dora=True),
    # AdaLoRA
    "adalora-llama": _adalora("llama", ["q_proj", "k_proj", "v_proj", "down_proj"]),
    "adalora-gpt2": _adalora("gpt2", ["c_attn", "c_fc"]),
    # AdaLoRA's and VeRA's dropout is torch's, drawn as HF PEFT draws it, so seeded runs match
    "adalora-llama-dropout": Case(
        "llama", lambda: peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_r=4,
                                            target_r=2, lora_alpha=8, lora_dropout=0.2, tinit=1, tfinal=1,
                                            total_step=5),
        lambda: pk.AdaLoRA(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_rank=4, target_rank=2,
                           alpha=8, dropout=0.2, tinit=1, tfinal=1, total_step=5), adalora=True),
    "vera-llama-dropout": Case("llama", lambda: peft.VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj",
                                                                                                      "v_proj"],
                                                                r=8, vera_dropout=0.2),
                               lambda: pk.VeRA(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], rank=8,
                                               dropout=0.2)),
    # the other methods
    "ia3-llama": Case("llama", lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj",
                                                                                              "down_proj"],
                                                      feedforward_modules=["down_proj"]),
                      lambda: pk.IA3(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"])),
    "loha-llama": Case("llama", lambda: peft.LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                                        r=4, alpha=8),
                       lambda: pk.LoHa(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], rank=4,
                                       alpha=8)),
    "loha-convnet": Case("convnet", lambda: peft.LoHaConfig(target_modules=["conv1", "conv2", "proj"], r=2, alpha=4),
                         lambda: pk.LoHa(target_modules=["conv1", "conv2", "proj"], rank=2, alpha=4)),
    # rank and module dropout drawn from the global generator in HF PEFT's order (README), so seeded runs match
    "loha-llama-dropout": Case("llama", lambda: peft.LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj",
                                                                                                      "v_proj"],
                                                                r=4, alpha=8, rank_dropout=0.3, module_dropout=0.3),
                               lambda: pk.LoHa(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], rank=4,
                                               alpha=8, rank_dropout=0.3, module_dropout=0.3)),
    "lokr-llama-dropout": Case("llama", lambda: peft.LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj",
                                                                                                      "v_proj"],
                                                                r=4, alpha=8, rank_dropout=0.3, module_dropout=0.3,
                                                                rank_dropout_scale=True),
                               lambda: pk.LoKr(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], rank=4,
                                               alpha=8, rank_dropout=0.3, module_dropout=0.3,
                                               rank_dropout_scale=True)),
    "lokr-llama": Case("llama", lambda: peft.LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                                        r=4, alpha=8, decompose_both=True),
                       lambda: pk.LoKr(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], rank=4,
                                       alpha=8, decompose_both=True)),
    "lokr-convnet": Case("convnet", lambda: peft.LoKrConfig(target_modules=["conv1", "conv2", "proj"], r=2, alpha=4),
                         lambda: pk.LoKr(target_modules=["conv1", "conv2", "proj"], rank=2, alpha=4)),
    "lokr-convnet-cp": Case("convnet", lambda: peft.LoKrConfig(target_modules=["conv2", "proj"], r=2, alpha=4,
                                                               use_effective_conv2d=True, decompose_both=True),
                            lambda: pk.LoKr(target_modules=["conv2", "proj"], rank=2, alpha=4,
                                            use_effective_conv2d=True, decompose_both=True)),
    "loha-convnet-cp": Case("convnet", lambda: peft.LoHaConfig(target_modules=["conv2", "proj"], r=2, alpha=4,
                                                               use_effective_conv2d=True),
                            lambda: pk.LoHa(target_modules=["conv2", "proj"], rank=2, alpha=4,
                                            use_effective_conv2d=True)),
    "ia3-gpt2": Case("gpt2", lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                                                    feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
                     lambda: pk.IA3(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                                    feedforward_modules=["mlp.c_proj"])),
    "ia3-convnet": Case("convnet", lambda: peft.IA3Config(target_modules=["conv2", "proj"],
                                                          feedforward_modules=["conv2"]),
                        lambda: pk.IA3(target_modules=["conv2", "proj"], feedforward_modules=["conv2"])),
    "vera-llama": Case("llama", lambda: peft.VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                                        r=8),
                       lambda: pk.VeRA(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], rank=8)),
    "vera-gpt2-bias": Case("gpt2", lambda: peft.VeraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=8,
                                                           fan_in_fan_out=True, bias="vera_only"),
                           lambda: pk.VeRA(task_type="CAUSAL_LM", target_modules=["c_attn"], rank=8,
                                           bias="vera_only")),
    "randlora-llama": Case("llama", lambda: peft.RandLoraConfig(
        task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], r=8, randlora_alpha=16, randlora_dropout=0.1),
        lambda: pk.RandLoRA(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], rank=8, alpha=16,
                            dropout=0.1)),
    "randlora-gpt2-sparse-bias": Case("gpt2", lambda: peft.RandLoraConfig(
        task_type="CAUSAL_LM", target_modules=["c_attn"], r=8, randlora_alpha=16, sparse=True, fan_in_fan_out=True,
        bias="randlora_only"),
        lambda: pk.RandLoRA(task_type="CAUSAL_LM", target_modules=["c_attn"], rank=8, alpha=16, sparse=True,
                            bias="randlora_only")),
    "ln_tuning-llama": Case("llama", lambda: peft.LNTuningConfig(task_type="CAUSAL_LM"),
                            lambda: pk.LNTuning(task_type="CAUSAL_LM")),
    "ln_tuning-bert": Case("bert", lambda: peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
                           lambda: pk.LNTuning(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    "trainable_tokens-gemma-tied": Case("gemma", lambda: peft.TrainableTokensConfig(task_type="CAUSAL_LM",
                                                                                     token_indices=[3, 5, 11]),
                                        lambda: pk.TrainableTokens(task_type="CAUSAL_LM", token_indices=[3, 5, 11])),
    "trainable_tokens-llama": Case("llama", lambda: peft.TrainableTokensConfig(task_type="CAUSAL_LM",
                                                                                token_indices=[3, 5, 11]),
                                   lambda: pk.TrainableTokens(task_type="CAUSAL_LM", token_indices=[3, 5, 11])),
    "prompt-llama": Case("llama", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                         lambda: pk.PromptTuning(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt-t5": Case("t5", lambda: peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
                      lambda: pk.PromptTuning(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)),
    "prefix-llama": Case("llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                         lambda: pk.PrefixTuning(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prefix-llama-projection": Case(
        "llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                 encoder_hidden_size=16),
        lambda: pk.PrefixTuning(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                encoder_hidden_size=16)),
    "prefix-gpt2": Case("gpt2", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                        lambda: pk.PrefixTuning(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix-t5": Case("t5", lambda: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
                      lambda: pk.PrefixTuning(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)),
    "prompt-bert": Case("bert", lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
                        lambda: pk.PromptTuning(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "ptuning-llama-mlp": Case(
        "llama", lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        lambda: pk.PTuning(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)),
    "ptuning-bert-lstm": Case(
        "bert", lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16,
                                                 encoder_reparameterization_type="LSTM"),
        lambda: pk.PTuning(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16,
                           encoder_reparameterization_type="LSTM")),
}


# ---------------------------------------------------------------------------------------------------- the harness


def pk_name(hf_name: str) -> str:
    """HF PEFT's name of a parameter of its wrapped model, spelled as peftkit's (README: the model inside HF PEFT's
    wrapper, except DoRA magnitudes, ``modules_to_save`` copies, trained token rows and prompt tables)."""
    name = hf_name.removeprefix("base_model.model.").removeprefix("base_model.")
    name = name.replace(".modules_to_save.", ".copies.").replace(".token_adapter.", ".")
    name = re.sub(r"(lora_magnitude_vector\.[^.]+)\.weight$", r"\1", name)
    if name.startswith("prompt_encoder."):
        name = name.replace("prompt_encoder.", "prompt_encoder.prompt_modules.", 1)
    return name


def _no_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of the base model off (GPT-2 and BERT drop 10 %), so the batches see the same model."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "dropout_rate"):
        if cfg is not None and hasattr(cfg, key):
            setattr(cfg, key, 0.0)
    return model


def batches(arch: str, seq: int, count: int, seed: int = 5, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of 2 rows with their labels, holding tokens 3, 5 and 11; ``padded``: the second row's
    first 3 tokens (its last 3 on BERT and T5) are padding, masked in ``attention_mask`` and left out of the
    labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 96, (2, seq), generator=gen)
        ids[0, 4], ids[1, 5], ids[1, 6] = 3, 5, 11  # the rows the token cases train
        mask = torch.ones_like(ids)
        if padded:
            mask[1, -3:] = 0 if arch in ("bert", "t5") else 1
            if arch not in ("bert", "t5"):
                mask[1, :3] = 0
            ids = ids.masked_fill(mask == 0, 0)
        masked = {"attention_mask": mask} if padded else {}
        if arch == "bert":
            out.append({"input_ids": ids, **masked, "labels": torch.randint(0, 3, (2,), generator=gen)})
        elif arch == "t5":
            out.append({"input_ids": ids, **masked, "labels": torch.randint(1, 96, (2, 5), generator=gen)})
        elif arch == "convnet":
            out.append({"input_ids": ids[:, :7], "labels": torch.randint(0, 10, (2,), generator=gen)})
        else:
            out.append({"input_ids": ids, **masked, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def loss_of(model: nn.Module, arch: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if arch == "convnet":
        return nn.functional.cross_entropy(model(input_ids=batch["input_ids"]), batch["labels"])
    return model(**batch).loss


def logits_of(model: nn.Module, arch: str, batch: dict[str, torch.Tensor], inference: bool = False) -> torch.Tensor:
    """Evaluation-mode logits under ``no_grad`` (or ``inference_mode``); the model goes back to training mode
    after."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode() if inference else torch.no_grad():
        if arch == "convnet":
            out = model(input_ids=batch["input_ids"])
        elif arch == "t5":
            out = model(**inputs, decoder_input_ids=batch["labels"]).logits
        else:
            out = model(**inputs).logits
    model.train()
    return out.clone() if inference else out


@dataclass
class Pair:
    """The two libraries' models for one case, and their trainable parameters in corresponding order."""

    hf: Any
    ours: nn.Module
    names: list[str]  # HF PEFT's names
    hf_params: list[nn.Parameter]
    pk_params: list[nn.Parameter]


def make_pair(case: Case, tmp_path: Path, seed: int = 0, base_dtype: torch.dtype = torch.float32) -> Pair:
    """Both models with the same starting adapter (HF PEFT's initial tensors, each moved by 0.1·N(0, 1)); the base
    models in ``base_dtype``."""

    def build(arch: str) -> nn.Module:
        return models.build(arch).to(base_dtype)

    hf = peft.get_peft_model(_no_dropout(build(case.arch)), case.hf())
    if base_dtype != torch.float32 and case.adalora:
        # HF PEFT 0.21.2 casts the adapter of a half-precision base to fp32 by making new parameters, and AdaLoRA's
        # rank count (the scale's denominator) comes out trainable: the optimizer would change the scale of every
        # layer. peftkit keeps it a constant (test_half_precision_base checks); so does HF PEFT on an fp32 base.
        ranknum = [p for n, p in hf.named_parameters() if ".ranknum." in n]
        assert ranknum and all(p.requires_grad for p in ranknum)
        for p in ranknum:
            p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    if case.init in ("load", "resume"):
        hf.save_pretrained(str(tmp_path / "init"))
        ours = pk.load_adapter(_no_dropout(build(case.arch)), tmp_path / "init", trainable=True)
        if case.init == "resume":  # both libraries load the file to train it further
            hf = peft.PeftModel.from_pretrained(_no_dropout(build(case.arch)), str(tmp_path / "init"),
                                                is_trainable=True)
    else:
        ours = pk.apply(_no_dropout(build(case.arch)), case.pk())
    if case.extra:
        for name, hf_config, pk_config in case.extra:
            hf.add_adapter(name, hf_config())
            pk.apply(ours, pk_config(), name=name)
        active = ["default", *(name for name, _, _ in case.extra)]
        hf.base_model.set_adapter(active)
        pk.set_adapter(ours, active)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.requires_grad and not re.search(r"\.default(\.|$)", name):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    names, hf_params, pk_params = [], [], []
    for name, p in hf.named_parameters():
        if p.requires_grad:
            names.append(name)
            hf_params.append(p)
            pk_params.append(mine.pop(pk_name(name)))
    assert not mine, f"peftkit trains more than HF PEFT: {sorted(mine)}"
    with torch.no_grad():
        for a, b in zip(hf_params, pk_params, strict=True):
            b.copy_(a)
    hf.train()
    ours.train()
    return Pair(hf, ours, names, hf_params, pk_params)


def optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``kind``: ``"fused"`` or ``"foreach"`` AdamW, or ``"sgd"``.

    Adam's ε is 1e-5 rather than 1e-8: its first step moves an entry by lr·g/(|g| + ε), so a difference in a
    gradient entry near zero reaches the parameter multiplied by up to lr/ε. fp32 rounding makes such differences:
    one entry was 8.9e-9 in one library and 2.9e-9 in the other, in a gradient whose largest entry is 0.04 and which
    agrees to 1.5e-7 of that everywhere (the first step's gradients are compared to that tolerance). With ε = 1e-8
    that entry moved by a quarter of lr more in one library, with ε = 1e-6 by 6e-5, still 15 times what the logits'
    tolerance allows after a step; with ε = 1e-5, lr/ε = 1000 keeps rounding below the tolerances. Gradients of a
    typical size (1e-4 to 1e-2 here) still take Adam's normalised steps."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=0.01, eps=1e-5, weight_decay=0.01, fused=kind == "fused",
                             foreach=kind == "foreach")


@dataclass
class Trace:
    """What one library's run recorded."""

    losses: list[torch.Tensor]
    grads: list[torch.Tensor]  # at the first step
    logits: list[torch.Tensor]  # in evaluation before the first step and after every step


@dataclass(frozen=True)
class Loop:
    """How a training loop calls the model besides its training forwards."""

    autocast: bool = False
    #: Evaluate under ``torch.inference_mode()`` rather than ``no_grad``.
    inference: bool = False
    #: Before every training forward, a reference forward with the adapters disabled, without gradients (as DPO
    #: trainers compute the reference model's log-probabilities); its logits are recorded with the evaluation's.
    reference: bool = False
    #: Train with the model in evaluation mode (gradients on), as loops that want no dropout at all do.
    eval_mode: bool = False
    #: Batches with padding and an attention mask.
    padded: bool = False
    #: Before every training forward, a forward of the same batch in training mode without gradients (as RL
    #: trainers compute the old policy's log-probabilities); its loss is recorded with the evaluation's logits.
    old_policy: bool = False
    #: ``zero_grad(set_to_none=False)``: gradients accumulate into the tensors of the step before.
    keep_grads: bool = False
    #: Batches of 20, 9 and 33 tokens in turn (2 rows each).
    varying: bool = False
    #: After every step, greedy decoding of 4 tokens with the KV cache (one-token forwards); its scores are recorded
    #: with the evaluation's logits.
    generate: bool = False


def reference_logits(model: nn.Module, arch: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), (model.disable_adapter() if hasattr(model, "peft_config") else pk.disable_adapters(model)):
        return loss_of(model, arch, batch).reshape(1) if arch == "convnet" else model(**batch).logits


def train(model: nn.Module, params: list[nn.Parameter], case: Case, data: list[dict[str, torch.Tensor]],
          opt_kind: str, steps: int, micro: int = 1, step_hook: Callable[[int], None] | None = None,
          loop: Loop = Loop()) -> Trace:
    """``steps`` optimizer steps, each over ``micro`` micro-batches (their mean loss), with evaluation logits after
    every step; the random generator is seeded before every call."""
    opt = optimizer(opt_kind, params)
    trace = Trace([], [], [])
    autocast = loop.autocast
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the first call evaluates
        trace.logits.append(logits_of(model, case.arch, data[0], loop.inference).float())
    for step in range(steps):
        total = torch.zeros(())
        for m in range(micro):
            torch.manual_seed(100 * step + m)
            if loop.reference:
                trace.logits.append(reference_logits(model, case.arch, data[step * micro + m]))
            if loop.old_policy:
                model.train()
                with torch.no_grad():
                    trace.logits.append(loss_of(model, case.arch, data[step * micro + m]).reshape(1))
            model.train(not loop.eval_mode)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model, case.arch, data[step * micro + m]) / micro
            loss.backward()
            total += loss.detach().float()
        trace.losses.append(total)
        if step == 0:
            trace.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        opt.step()
        if step_hook is not None:
            step_hook(step)
        opt.zero_grad(set_to_none=not loop.keep_grads)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            trace.logits.append(logits_of(model, case.arch, data[0], loop.inference).float())
        if loop.generate and TASK[case.arch] == "CAUSAL_LM":
            trace.logits.append(greedy_scores(model, data[0]["input_ids"][:, :6]))
    return trace


def greedy_scores(model: nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    """The scores of 4 greedily decoded tokens (evaluation mode, KV cache); the model goes back to training mode."""
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    model.train()
    return torch.stack(out.scores)


def run_both(case: Case, tmp_path: Path, opt_kind: str = "fused", steps: int = 3, micro: int = 1,
             autocast: bool = False, checkpointing: bool = False, reentrant: bool = False, loop: Loop | None = None,
             base_dtype: torch.dtype = torch.float32) -> tuple[Pair, Trace, Trace]:
    loop = loop or Loop(autocast=autocast)
    pair = make_pair(case, tmp_path, base_dtype=base_dtype)
    if checkpointing:
        for model in (pair.hf, pair.ours):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:  # (the reentrant form only reaches the adapters' gradients through an input that has one)
                model.enable_input_require_grads()
    data = batches(case.arch, case.seq, steps * micro, padded=loop.padded)
    if loop.varying:
        data = [batches(case.arch, (20, 9, 33)[i % 3], 1, seed=i, padded=loop.padded)[0] for i in range(len(data))]
    hf_hook = pk_hook = None
    if case.adalora:
        def hf_hook(step: int) -> None:
            pair.hf.base_model.update_and_allocate(step)

        def pk_hook(step: int) -> None:
            pk.adalora_step(pair.ours, step)
    theirs = train(pair.hf, pair.hf_params, case, data, opt_kind, steps, micro, hf_hook, loop)
    ours = train(pair.ours, pair.pk_params, case, data, opt_kind, steps, micro, pk_hook, loop)
    return pair, ours, theirs


def saved(pair: Pair, tmp_path: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, peftkit's tensor, HF PEFT's tensor) for every key of the two adapter files, which hold the same keys."""
    # (HF PEFT would also store the base weight of an adapted embedding, which peftkit reads but does not write.)
    pair.hf.save_pretrained(str(tmp_path / "hf"), save_embedding_layers=False)
    pk.save_adapter(pair.ours, tmp_path / "pk")
    files = sorted(p.relative_to(tmp_path / "hf") for p in (tmp_path / "hf").rglob("adapter_model.safetensors"))
    assert files == sorted(p.relative_to(tmp_path / "pk") for p in (tmp_path / "pk").rglob("adapter_model.safetensors"))
    for file in files:
        mine, want = (load_file(str(tmp_path / d / file)) for d in ("pk", "hf"))
        assert mine.keys() == want.keys(), (sorted(mine.keys() ^ want.keys()))
        for key in sorted(want):
            yield f"{file.parent}/{key}", mine[key], want[key]


#: Losses agree to fp32 rounding (the libraries sum the same products in other orders), amplified a little by each
#: step; a wrong gradient or a stale cache moves them by 1e-3 or more.
LOSS = {"rtol": 1e-5, "atol": 1e-6}
#: Logits and tensors after up to four steps, absolute tolerance as a share of the largest entry. Adam divides by
#: √v, so the rounding of a gradient entry near zero reaches the parameters amplified (see :func:`optimizer`): most
#: cases agree to 1e-6 of the scale, two adapters trained together to 1.4e-5 (under SGD to 1e-6). A stale cache
#: (the fused-optimizer bug) moved the logits by 1e-2 of their scale, and four steps move them by about 0.5.
AFTER = {"rtol": 1e-4, "atol": 3e-5}


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5, scale: float = 1e-5) -> None:
    """``got`` equals ``want`` within ``rtol`` relative and ``scale`` times ``want``'s largest entry absolute."""
    atol = scale * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=max(atol, 1e-8), msg=lambda m: f"{what}: {m}")


def check(pair: Pair, ours: Trace, theirs: Trace, tmp_path: Path, grads: bool = True, tol: float = 1.0,
          logits_resolution: float | None = None) -> None:
    """Losses, first-step gradients, evaluation logits and saved files; ``logits_resolution``: the logits come from
    a half-precision model, compared to that relative resolution."""
    for step, (a, b) in enumerate(zip(ours.losses, theirs.losses, strict=True)):
        torch.testing.assert_close(a, b, rtol=LOSS["rtol"] * tol, atol=LOSS["atol"] * tol,
                                   msg=lambda m, s=step: f"loss at step {s}: {m}")
    if grads:
        assert any(g.any() for g in theirs.grads), "nothing to compare: no gradient reached the adapter"
        for name, a, b in zip(pair.names, ours.grads, theirs.grads, strict=True):
            close(a, b, f"gradient of {name}", rtol=1e-4 * tol, scale=1e-5 * tol)
    logits_tol = AFTER["rtol"] * tol, AFTER["atol"] * tol
    if logits_resolution is not None:
        logits_tol = logits_resolution, logits_resolution
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits, strict=True)):
        close(a, b, f"evaluation logits after step {step}", rtol=logits_tol[0], scale=logits_tol[1])
    for key, a, b in saved(pair, tmp_path):
        close(a, b, f"saved {key}", rtol=AFTER["rtol"] * tol, scale=AFTER["atol"] * tol)


@pytest.fixture
def short_groups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cases with short inputs lower the group threshold to one token, so their siblings group too."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and CASES[callspec.params["name"]].seq < 16:
        monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)


# ---------------------------------------------------------------------------------------------------- the tests


#: Cases where peftkit deliberately trains otherwise than HF PEFT (each has its own test below).
DIFFERENT = {"loha-convnet-cp"}


@pytest.mark.parametrize("name", [n for n in CASES if n not in DIFFERENT])
def test_training_matches_hf_peft(name: str, short_groups: None, tmp_path: Path) -> None:
    """Three steps of fused AdamW: losses, first-step gradients, evaluation logits before and after every step,
    files."""
    case = CASES[name]
    pair, ours, theirs = run_both(case, tmp_path)
    check(pair, ours, theirs, tmp_path)
    if name in GROUPED:  # these cases really trained through groups, not only through the per-layer path
        assert lora_groups.group_of(pair.ours.get_submodule(GROUPED[name])) is not None


#: Sibling projections (one input, several adapted layers) that run as a group after the first two calls.
GROUPED = {"lora-llama-all-linear": "model.layers.0.self_attn.q_proj",
           "lora-llama-all-linear-short": "model.layers.1.mlp.gate_proj",
           "dora-llama-all-linear": "model.layers.0.self_attn.k_proj",
           "dora-llama-all-linear-short": "model.layers.1.mlp.up_proj",
           "lora-llama-qv-short": "model.layers.0.self_attn.v_proj"}


#: LoRA and DoRA under the other optimizers, with groups of long and of short inputs and without.
@pytest.mark.parametrize("name,opt_kind", [
    ("lora-llama-all-linear", "foreach"), ("lora-gpt2-conv1d", "foreach"), ("dora-llama-all-linear-short", "foreach"),
    ("lora-llama-all-linear-short", "sgd"), ("dora-llama-all-linear", "sgd"), ("dora-convnet", "sgd")])
def test_other_optimizers(name: str, opt_kind: str, short_groups: None, tmp_path: Path) -> None:
    """Foreach AdamW (which moves version counters) and plain SGD train to the same numbers as HF PEFT."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, opt_kind=opt_kind)
    check(pair, ours, theirs, tmp_path)


@pytest.mark.parametrize("name", ["lora-llama-all-linear", "dora-llama-all-linear-short", "adalora-llama",
                                  "prefix-llama", "lora-bert-classifier"])
def test_gradient_accumulation(name: str, short_groups: None, tmp_path: Path) -> None:
    """Two micro-batches per fused step: gradients summed over two backward passes before the optimizer runs."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, steps=2, micro=2)
    check(pair, ours, theirs, tmp_path)


@pytest.mark.parametrize("name", ["lora-llama-all-linear-short"])
def test_bf16_autocast_lora(name: str, short_groups: None, tmp_path: Path) -> None:
    """Under bf16 autocast LoRA runs the same bf16 products in both libraries, grouped or not: the same numbers."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, autocast=True)
    check(pair, ours, theirs, tmp_path)


def test_bf16_autocast_dora(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under bf16 autocast DoRA's terms are rounded to bf16 in another order (peftkit forms m/‖W + sBA‖ once per
    weight and scales the sum; HF PEFT scales the base output and the adapter's apart), so the libraries differ by a
    few bf16 roundings: the first step's gradients by about 1 % (each library's own bf16 gradients differ from its
    fp32 ones by as much), and the logits by as much as HF PEFT's bf16 logits differ from its fp32 ones (up to 1.5
    times that seen). Adam turns
    such differences in small gradient entries into whole steps, so the files are not compared here."""
    monkeypatch.setattr(lora_groups, "MIN_TOKENS", 1)
    case = CASES["dora-llama-all-linear-short"]
    pair, ours, theirs = run_both(case, tmp_path, autocast=True)
    _, ours32, theirs32 = run_both(case, tmp_path / "fp32")
    for step in range(3):
        torch.testing.assert_close(ours.losses[step], theirs.losses[step], rtol=2e-4, atol=0)
        error = (ours.logits[step] - theirs.logits[step]).abs().max()
        assert error < 2 * (theirs.logits[step] - theirs32.logits[step]).abs().max(), (step, error)
    ours_error = theirs_error = 0.0
    for name, a, b, a32, b32 in zip(pair.names, ours.grads, theirs.grads, ours32.grads, theirs32.grads, strict=True):
        assert (a - b).norm() < 0.05 * b32.norm(), name
        ours_error += float((a - a32).norm() / a32.norm())
        theirs_error += float((b - b32).norm() / b32.norm())
    assert ours_error < 1.25 * theirs_error, (ours_error, theirs_error)  # peftkit's bf16 is no less accurate


@pytest.mark.parametrize("name,reentrant", [
    ("lora-llama-all-linear", True), ("dora-llama-all-linear", True), ("dora-llama-all-linear", False),
    ("lora-llama-tokens", False), ("adalora-llama", True)])
def test_gradient_checkpointing(name: str, reentrant: bool, tmp_path: Path) -> None:
    """With activation checkpointing every block runs its forward twice: the recomputed forward must save what the
    first saved, and the cached norms must not go stale in between. The reentrant form runs the first forward
    without gradients."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, steps=2, checkpointing=True, reentrant=reentrant)
    check(pair, ours, theirs, tmp_path)


#: Methods that fold into the weights, after training.
MERGED = ["lora-llama-all-linear", "lora-qwen2-lora_bias", "lora-llama-embedding", "dora-llama-all-linear",
          "dora-convnet", "adalora-llama", "loha-convnet", "trainable_tokens-gemma-tied"]


@pytest.mark.parametrize("name", MERGED)
def test_merge_after_training(name: str, short_groups: None, tmp_path: Path) -> None:
    """The trained adapters merged into the weights, and taken out again, give HF PEFT's logits (the fast paths'
    caches of the unmerged weights must follow both), and train on to the same numbers."""
    case = CASES[name]
    pair, ours, theirs = run_both(case, tmp_path, steps=2)
    data = batches(case.arch, case.seq, 1)[0]
    pk.merge(pair.ours)
    pair.hf.merge_adapter()
    close(logits_of(pair.ours, case.arch, data), logits_of(pair.hf, case.arch, data), "merged logits",
          rtol=AFTER["rtol"], scale=AFTER["atol"])
    pk.unmerge(pair.ours)
    pair.hf.unmerge_adapter()
    close(logits_of(pair.ours, case.arch, data), theirs.logits[-1], "unmerged logits",
          rtol=AFTER["rtol"], scale=AFTER["atol"])
    more = batches(case.arch, case.seq, 2, seed=11)  # and training goes on from the unmerged adapters
    theirs = train(pair.hf, pair.hf_params, case, more, "fused", 2)
    ours = train(pair.ours, pair.pk_params, case, more, "fused", 2)
    check(pair, ours, theirs, tmp_path)


def test_adalora_allocates_the_same_ranks(tmp_path: Path) -> None:
    """Rank allocation ran (tinit=tfinal=1 of 5 steps) and masked the same triplets in both libraries; the trained
    tensors agree (test_training_matches_hf_peft), so do the masks in the files' ``rank_pattern``."""
    pair, ours, theirs = run_both(CASES["adalora-llama"], tmp_path, steps=4)
    check(pair, ours, theirs, tmp_path)
    mine, want = (json.loads((tmp_path / d / "adapter_config.json").read_text())["rank_pattern"] for d in ("pk", "hf"))
    assert mine == want
    assert any(not kept for mask in want.values() for kept in mask)


def test_adalora_evaluation_loss_has_no_penalty(tmp_path: Path) -> None:
    """Deliberate difference (README): peftkit adds AdaLoRA's orthogonality penalty to the loss in training mode only,
    so an evaluation loss is the task's loss; HF PEFT adds it in evaluation too. Without its penalty, HF PEFT's
    evaluation loss is peftkit's."""
    pair, _, _ = run_both(CASES["adalora-llama"], tmp_path, steps=2)
    batch = batches("llama", 20, 1)[0]
    losses = []
    for model in (pair.ours, pair.hf):
        model.eval()
        with torch.no_grad():
            losses.append(model(**batch).loss)
    ours, theirs = losses
    assert theirs > ours + 1e-4
    pair.hf.peft_config["default"].orth_reg_weight = 0.0
    with torch.no_grad():
        torch.testing.assert_close(ours, pair.hf(**batch).loss, **LOSS)


def test_loha_effective_conv_trains_with_the_forward_gradients(tmp_path: Path) -> None:
    """Deliberate difference (README): HF PEFT's hand-written backward for LoHa's CP form (``use_effective_conv2d``)
    gives wrong gradients for ``hada_w1_a`` and ``hada_w2_a`` (tests/methods/test_loha_lokr.py runs gradcheck on
    peftkit's); peftkit uses the gradients of its forward. The losses before the first step, and every other
    gradient, agree; those two differ on the convolution (by order 1, not rounding)."""
    pair, ours, theirs = run_both(CASES["loha-convnet-cp"], tmp_path, steps=1)
    torch.testing.assert_close(ours.losses[0], theirs.losses[0], **LOSS)
    close(ours.logits[0], theirs.logits[0], "logits before training")
    for name, a, b in zip(pair.names, ours.grads, theirs.grads, strict=True):
        if name.startswith("base_model.model.conv2.") and ("hada_w1_a" in name or "hada_w2_a" in name):
            assert (a - b).norm() > 0.1 * b.norm(), name
        else:
            close(a, b, f"gradient of {name}", rtol=1e-4, scale=1e-5)


#: Cases for the other ways a loop calls the model: per-layer and grouped LoRA and DoRA, and methods with caches.
LOOPED = ["lora-llama-all-linear-short", "dora-llama-all-linear", "dora-llama-all-linear-short", "dora-convnet",
          "lora-llama-tokens", "adalora-llama"]


#: ``busy``: every other call a loop may make, together (padded batches of varying length, a reference forward with
#: the adapters off and an old-policy forward without gradients before every training forward, evaluation under
#: ``inference_mode`` and greedy decoding after every step, gradients kept between steps); ``eval_mode``: training
#: in evaluation mode.
LOOPS = {"busy": Loop(inference=True, reference=True, old_policy=True, keep_grads=True, varying=True, padded=True,
                      generate=True),
         "eval_mode": Loop(eval_mode=True)}


# (AdaLoRA trained in evaluation mode is left out: HF PEFT adds the orthogonality penalty in evaluation mode too,
# peftkit only in training mode; see test_adalora_evaluation_loss_has_no_penalty.)
@pytest.mark.parametrize("name,loop", [pytest.param(n, loop, id=f"{n}-{k}") for n in LOOPED
                                       for k, loop in LOOPS.items() if (n, k) != ("adalora-llama", "eval_mode")])
def test_other_loops(name: str, loop: Loop, short_groups: None, tmp_path: Path) -> None:
    """Evaluation under ``inference_mode`` between steps (nothing cached there may reach a training forward),
    no-gradient forwards with the adapters disabled and enabled before every training forward, inputs whose length
    changes from call to call (groups break and form again), gradients kept between steps; and training in
    evaluation mode."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, loop=loop)
    check(pair, ours, theirs, tmp_path)


@pytest.mark.parametrize("name", ["prompt-llama", "prompt-t5", "prefix-llama-projection", "ptuning-bert-lstm"])
def test_padded_batches(name: str, tmp_path: Path) -> None:
    """Padded rows with an attention mask: the prompt methods extend the mask over their virtual tokens."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, steps=2, loop=Loop(padded=True))
    check(pair, ours, theirs, tmp_path)


def test_dora_beside_an_earlier_lora_adapter(tmp_path: Path) -> None:
    """Deliberate difference: with a LoRA adapter active before a DoRA adapter on one layer, HF PEFT 0.21.2 (at
    dropout 0, or in evaluation) hands the DoRA update the running output, the earlier LoRA update included, as its
    ``base_result``, so m/‖W + sBA‖ rescales the other adapter's update too; with DoRA first, or with dropout in
    training, it does not. peftkit computes every active adapter from the base layer's output (README: "Active
    adapters are each computed from the unmerged weight"), whatever their order: it gives HF PEFT's numbers for the
    order in which DoRA comes first."""
    case = CASES["dora-lora-llama-two-adapters"]
    pair = make_pair(case, tmp_path)
    batch = batches("llama", 20, 1)[0]
    pk.set_adapter(pair.ours, ["other", "default"])  # LoRA first
    ours = logits_of(pair.ours, "llama", batch)
    dora_first = logits_of(pair.hf, "llama", batch)
    pair.hf.base_model.set_adapter(["other", "default"])
    lora_first = logits_of(pair.hf, "llama", batch)
    close(ours, dora_first, "logits")
    assert (lora_first - dora_first).abs().max() > 1e-3


@pytest.mark.parametrize("case", [_lora("llama", "all-linear", lora_dropout=0.1),
                                  _lora("llama", "all-linear", lora_dropout=0.1, use_dora=True),
                                  _lora("gpt2", ["c_attn", "c_fc"], lora_dropout=0.1, use_dora=True)],
                         ids=["lora", "dora", "dora-gpt2"])
def test_dropout_adapters_trained_in_evaluation_mode(case: Case, tmp_path: Path) -> None:
    """Adapters with dropout, trained in evaluation mode (no dropout drawn): the dropout-aware paths (DoRA's adapter
    branch, the shared masks of grouped siblings) must then compute what HF PEFT does. (In training mode the masks
    are drawn otherwise than HF PEFT's, and DoRA drops out the adapter branch only: README, Performance.)"""
    pair, ours, theirs = run_both(case, tmp_path, loop=Loop(eval_mode=True))
    check(pair, ours, theirs, tmp_path)


RESUMED = ["lora-llama-tokens", "lora-bert-classifier", "lora-qwen2-bias-all", "dora-llama-all-linear",
           "adalora-llama", "lokr-llama", "vera-gpt2-bias", "trainable_tokens-gemma-tied"]


@pytest.mark.parametrize("name", RESUMED)
def test_training_a_loaded_adapter(name: str, tmp_path: Path) -> None:
    """An adapter saved by HF PEFT, loaded for training by both libraries (``PeftModel.from_pretrained(...,
    is_trainable=True)``, ``pk.load_adapter(..., trainable=True)``): the same tensors train (make_pair pairs them
    all), to the same numbers. (HF PEFT refuses to load a prompt-learning adapter for training.)"""
    case = CASES[name]
    pair, ours, theirs = run_both(Case(case.arch, case.hf, case.pk, init="resume", adalora=case.adalora), tmp_path,
                                  steps=2)
    check(pair, ours, theirs, tmp_path)


@pytest.mark.parametrize("name,frozen", [
    ("lora-llama-all-linear-short", "lora_B"), ("dora-llama-all-linear", "lora_A"),
    ("dora-llama-all-linear-short", "magnitude"), ("dora-lora-llama-two-adapters", ".default")])
def test_partly_frozen_adapters(name: str, frozen: str, short_groups: None, tmp_path: Path) -> None:
    """Some of the adapter's tensors frozen by hand after it is built (LoRA-FA's fixed A, a fixed DoRA magnitude,
    one of two adapters): the fast paths compute only the gradients that are wanted, and those equal HF PEFT's."""
    pair = make_pair(CASES[name], tmp_path)
    keep = [i for i, n in enumerate(pair.names) if frozen not in n]
    assert 0 < len(keep) < len(pair.names)
    for i, (hf_param, pk_param) in enumerate(zip(pair.hf_params, pair.pk_params, strict=True)):
        if i not in keep:
            hf_param.requires_grad_(False)
            pk_param.requires_grad_(False)
    pair.names = [pair.names[i] for i in keep]
    pair.hf_params = [pair.hf_params[i] for i in keep]
    pair.pk_params = [pair.pk_params[i] for i in keep]
    data = batches(CASES[name].arch, CASES[name].seq, 3)
    theirs = train(pair.hf, pair.hf_params, CASES[name], data, "fused", 3)
    ours = train(pair.ours, pair.pk_params, CASES[name], data, "fused", 3)
    assert all(p.grad is None for p in pair.ours.parameters() if not p.requires_grad)
    check(pair, ours, theirs, tmp_path)


@pytest.mark.parametrize("name", ["lora-llama-all-linear", "dora-llama-all-linear-short"])
def test_copies_of_a_trained_model(name: str, short_groups: None, tmp_path: Path) -> None:
    """A deep copy of a trained model (as trainers make a frozen reference model) computes with its own tensors,
    not with the original's that keep training, and so does the copy after a cast to float64."""
    case = CASES[name]
    pair, _, _ = run_both(case, tmp_path, steps=2)
    ours, theirs = copy.deepcopy(pair.ours), copy.deepcopy(pair.hf)
    with torch.no_grad():  # the originals move on
        for p in [*pair.hf_params, *pair.pk_params]:
            p.add_(0.5)
    data = batches(case.arch, case.seq, 2, seed=9)
    close(logits_of(ours, case.arch, data[0]), logits_of(theirs, case.arch, data[0]), "the copy's logits",
          rtol=AFTER["rtol"], scale=AFTER["atol"])
    torch.testing.assert_close(loss_of(ours, case.arch, data[1]), loss_of(theirs, case.arch, data[1]), **LOSS)
    ours.double()
    theirs.double()
    close(logits_of(ours, case.arch, data[0]), logits_of(theirs, case.arch, data[0]), "float64 logits",
          rtol=AFTER["rtol"], scale=AFTER["atol"])


def test_switching_adapters_between_steps(tmp_path: Path) -> None:
    """A DoRA and a LoRA adapter on the same layers, trained in turn (DoRA alone, LoRA alone, both): the groups and
    cached norms formed for one set of active adapters must not serve another."""
    case = CASES["dora-lora-llama-two-adapters"]
    pair = make_pair(case, tmp_path)
    schedule: list[list[str]] = [["default"], ["other"], ["default", "other"]]

    def activate(step: int, hf: bool) -> None:
        if step + 1 < len(schedule):
            (pair.hf.base_model.set_adapter if hf else lambda names: pk.set_adapter(pair.ours, names))(
                schedule[step + 1])

    activate(-1, True)
    activate(-1, False)
    data = batches(case.arch, case.seq, 3)
    theirs = train(pair.hf, pair.hf_params, case, data, "fused", 3, step_hook=lambda s: activate(s, True))
    ours = train(pair.ours, pair.pk_params, case, data, "fused", 3, step_hook=lambda s: activate(s, False))
    check(pair, ours, theirs, tmp_path)


class _Batches(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


@pytest.mark.parametrize("name", ["lora-llama-all-linear", "dora-llama-all-linear"])
def test_transformers_trainer(name: str, tmp_path: Path) -> None:
    """``transformers.Trainer`` (fused AdamW, evaluation after every step) trains both libraries' models to the same
    evaluation losses and files."""
    from transformers import Trainer, TrainingArguments

    case = CASES[name]
    pair = make_pair(case, tmp_path)
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches(case.arch, case.seq, 4) for i in range(2)]
    results = []
    for model in (pair.hf, pair.ours):
        args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2,
                                 per_device_eval_batch_size=2, learning_rate=1e-2, adam_epsilon=1e-5,
                                 optim="adamw_torch_fused", eval_strategy="steps", eval_steps=1, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=_Batches(rows[:6]), eval_dataset=_Batches(rows[6:]))
        trainer.train()
        results.append([log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log])
    ours, theirs = results[1], results[0]
    assert len(theirs) == 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), **LOSS)
    for key, a, b in saved(pair, tmp_path):
        close(a, b, f"saved {key}", rtol=AFTER["rtol"], scale=AFTER["atol"])


@pytest.mark.parametrize("name", ["lora-llama-all-linear", "dora-llama-all-linear-short", "adalora-llama",
                                  "vera-llama"])
def test_half_precision_base(name: str, short_groups: None, tmp_path: Path) -> None:
    """A bf16 base model: both libraries keep the adapter in fp32 and compute the base in bf16, to the same numbers
    (the adapters to fp32 rounding, which can flip the last bit of a bf16 logit). Deliberate difference: HF PEFT
    0.21.2 makes AdaLoRA's rank count trainable there (make_pair freezes it before comparing); in peftkit it stays
    the constant it is on an fp32 base."""
    pair, ours, theirs = run_both(CASES[name], tmp_path, base_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in pair.pk_params)
    check(pair, ours, theirs, tmp_path, logits_resolution=2**-8)
    if CASES[name].adalora:
        assert any(".ranknum." in n for n in pair.ours.state_dict())
        assert not any(".ranknum." in n for n, p in pair.ours.named_parameters() if p.requires_grad)


def _settings(opt: torch.optim.Optimizer) -> dict[int, tuple[float, float]]:
    """(lr, weight decay) of every parameter the optimizer holds, by the parameter's id."""
    return {id(p): (group["lr"], group["weight_decay"]) for group in opt.param_groups for p in group["params"]}


@pytest.mark.parametrize("name", ["lora-qwen2-lora_bias", "lora-qwen2-bias-all", "lora-llama-norm-saved",
                                  "dora-llama-embedding"])
def test_loraplus_groups(name: str, tmp_path: Path) -> None:
    """LoRA+ (``optimizer.loraplus_ratio``) puts every parameter in the learning-rate and weight-decay group HF PEFT's
    ``create_loraplus_optimizer`` does, and the fused runs train alike. Two deliberate differences (README, LoRA+):
    DoRA magnitudes keep ``lr`` (HF PEFT: ``lr × ratio``, as a 1-D parameter), and LoRA on an embedding has A at
    ``lr`` and B at ``lr × ratio`` (HF PEFT: both at ``loraplus_lr_embedding``)."""
    from peft.optimizers import create_loraplus_optimizer

    from peftkit.train.config import OptimizerConfig
    from peftkit.train.optim import param_groups

    case = CASES[name]
    pair = make_pair(case, tmp_path)
    lr, ratio, decay = 0.01, 4.0, 0.1
    theirs_opt = create_loraplus_optimizer(pair.hf, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                           loraplus_weight_decay=decay, eps=1e-5, fused=True)
    groups = param_groups(pair.ours, OptimizerConfig(lr=lr, loraplus_ratio=ratio, weight_decay=decay, eps=1e-5))
    ours_opt = torch.optim.AdamW(groups, weight_decay=decay, eps=1e-5, fused=True)
    theirs, ours = _settings(theirs_opt), _settings(ours_opt)
    differ = 0
    for hf_name, a, b in zip(pair.names, pair.hf_params, pair.pk_params, strict=True):
        if "lora_magnitude_vector" in hf_name:
            assert (theirs[id(a)], ours[id(b)]) == ((lr * ratio, decay), (lr, decay)), hf_name
            differ += 1
        elif "lora_embedding_" in hf_name:
            assert theirs[id(a)] == (1e-6, decay), hf_name
            assert ours[id(b)] == (lr * ratio if "lora_embedding_B" in hf_name else lr, decay), hf_name
            differ += 1
        else:
            assert ours[id(b)] == theirs[id(a)], hf_name
    if differ:
        return
    data = batches(case.arch, case.seq, 3)
    trace = []
    for model, opt in ((pair.hf, theirs_opt), (pair.ours, ours_opt)):
        losses = []
        for step, batch in enumerate(data):
            torch.manual_seed(step)
            loss = loss_of(model, case.arch, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        trace.append(torch.stack(losses))
    torch.testing.assert_close(trace[1], trace[0], **LOSS)
    for key, a_, b_ in saved(pair, tmp_path):
        close(a_, b_, f"saved {key}", rtol=AFTER["rtol"], scale=AFTER["atol"])
