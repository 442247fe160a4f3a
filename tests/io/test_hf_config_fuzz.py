"""Random HF PEFT configurations, both ways: HF PEFT → peftkit → HF PEFT gives the same logits and tensors.

Each case draws a configuration HF PEFT users write (a subset of targets or ``all-linear``, rank and alpha,
rsLoRA, DoRA, regex rank/alpha patterns, ``layers_to_transform``, ``exclude_modules``, ``bias``, ``lora_bias``,
``modules_to_save``, ``alora_invocation_tokens``), builds it with HF PEFT on a tiny model, moves every adapter
tensor off its initial value, and checks that peftkit loads it with HF PEFT's logits and saves files HF PEFT
loads back to the same logits, with the same tensors.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk

from models import build, run

peft = pytest.importorskip("peft")

LEAVES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
LAYERS = {"llama": "layers", "gpt2": "h", "bert": "layer", "t5": "block"}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings", "t5": "shared"}
#: Activated LoRA's invocations, for the test input (models.py): in the middle of row 0 only, at its end, in row 1.
INVOCATIONS = [[12, 8], [11], [80, 33, 76]]


def draw(rng: random.Random, arch: str) -> dict[str, Any]:
    """One random LoraConfig's keyword arguments for ``arch``."""
    leaves = LEAVES[arch]
    targets: Any = "all-linear" if rng.random() < 0.25 else rng.sample(leaves, rng.randint(1, len(leaves)))
    if targets != "all-linear" and rng.random() < 0.3:
        targets.append(EMBEDDING[arch])
    named = leaves if targets == "all-linear" else targets
    kw: dict[str, Any] = {
        "task_type": TASK[arch], "target_modules": targets, "r": rng.choice([1, 2, 4]),
        "lora_alpha": rng.choice([1, 4, 8, 16]), "use_rslora": rng.random() < 0.3,
        "use_dora": rng.random() < 0.3, "bias": rng.choice(["none", "none", "lora_only", "all"]),
    }
    if arch == "gpt2":
        kw["fan_in_fan_out"] = True
    if rng.random() < 0.4:
        kw["rank_pattern"] = {pattern_key(rng, named, arch): rng.choice([1, 3])}
    if rng.random() < 0.4:
        kw["alpha_pattern"] = {pattern_key(rng, named, arch): rng.choice([2, 5])}
    if targets != "all-linear" and EMBEDDING[arch] not in targets and rng.random() < 0.2:
        kw["target_modules"] = rf".*\.({'|'.join(targets)})"  # a regex string, matched in full
    if rng.random() < 0.3 and targets != "all-linear":  # (HF PEFT takes layer indices with a list only)
        kw["layers_to_transform"] = [rng.randint(0, 1)]
        kw["layers_pattern"] = LAYERS[arch]
    elif rng.random() < 0.3 and len(named) > 1:
        kw["exclude_modules"] = [rng.choice(named[1:])]
    if kw["use_dora"] and kw["bias"] != "none":
        kw["bias"] = "none"  # (HF PEFT does not combine a trained bias with DoRA)
    # Drawn last, so the other fields of each case do not depend on it. HF PEFT refuses it for DoRA and embeddings.
    if not kw["use_dora"] and EMBEDDING[arch] not in named and rng.random() < 0.3:
        kw["lora_bias"] = True
    if not kw["use_dora"] and EMBEDDING[arch] not in named and TASK[arch] == "CAUSAL_LM" and rng.random() < 0.3:
        kw["alora_invocation_tokens"] = rng.choice(INVOCATIONS)
    return kw


def pattern_key(rng: random.Random, named: list[str], arch: str) -> str:
    """A rank/alpha pattern key: a leaf name, an alternation of two, or a path regex into one layer."""
    choice = rng.random()
    if choice < 0.4 or len(named) < 2:
        return rng.choice(named)
    if choice < 0.7:
        return "|".join(rng.sample(named, 2))
    return rf"{LAYERS[arch]}\.1\..*{rng.choice(named)}"


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_bias_all_writes_hf_peft_keys_with_a_saved_classifier(tmp_path) -> None:
    """bias="all" trains every bias; HF PEFT keys an adapted layer's under ``base_layer`` and a saved module's
    under ``original_module``/``modules_to_save``, once each: peftkit writes and reads exactly those keys."""
    hf = peft.get_peft_model(build("bert"), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2,
                                                            bias="all"))
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = pk.apply(build("bert"), pk.LoRA(target_modules=["query"], rank=2, bias="all", task_type="SEQ_CLS"))
    pk.save_adapter(ours, tmp_path / "pk")
    theirs = load_file(str(tmp_path / "hf" / "adapter_model.safetensors")).keys()
    mine = load_file(str(tmp_path / "pk" / "adapter_model.safetensors")).keys()
    assert mine == theirs
    prefix = "base_model.model."
    assert {f"{prefix}bert.encoder.layer.0.attention.self.query.base_layer.bias",
            f"{prefix}classifier.original_module.bias", f"{prefix}classifier.modules_to_save.bias"} <= set(mine)
    assert f"{prefix}bert.encoder.layer.0.attention.self.query.bias" not in mine


def draw_other(rng: random.Random, arch: str) -> Any:
    """A random IA3, AdaLoRA, prompt, prefix or P-tuning config for ``arch``."""
    leaves, task = LEAVES[arch], TASK[arch]
    layers: dict[str, Any] = {}
    if rng.random() < 0.3:
        layers = {"layers_to_transform": [rng.randint(0, 1)], "layers_pattern": LAYERS[arch]}
    kind = rng.choice(["ia3", "adalora", "prompt", "prefix", "ptuning"])
    if kind == "prefix" and arch == "bert":
        kind = "prompt"  # (HF PEFT 0.21 refuses prefix tuning on BERT under transformers 5: no KV cache)
    if kind == "ia3":
        targets = rng.sample(leaves, rng.randint(1, len(leaves)))
        return peft.IA3Config(task_type=task, target_modules=targets, init_ia3_weights=False,
                              feedforward_modules=rng.sample(targets, rng.randint(0, len(targets))),
                              fan_in_fan_out=arch == "gpt2")
    if kind == "adalora":
        return peft.AdaLoraConfig(task_type=task, target_modules=rng.sample(leaves, rng.randint(1, len(leaves))),
                                  init_r=rng.choice([2, 4]), target_r=1, total_step=20, lora_alpha=rng.choice([2, 8]),
                                  fan_in_fan_out=arch == "gpt2", **layers)
    tokens = rng.choice([1, 3, 5])
    if kind == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=tokens)
    if kind == "prefix":
        projection = rng.random() < 0.5
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=projection,
                                       encoder_hidden_size=rng.choice([8, 16]))
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=rng.choice([8, 16]),
                                    encoder_reparameterization_type=rng.choice(["MLP", "LSTM"]))


def draw_ours(rng: random.Random, arch: str) -> Any:
    """A random peftkit LoRA/DoRA config: leaf names, globs and aliases, layer indices, exclusions, patterns."""
    leaves = LEAVES[arch]
    targets: Any = rng.choice([
        lambda: rng.sample(leaves, rng.randint(1, len(leaves))),
        lambda: "all-linear",
        lambda: [f"*.{LAYERS[arch]}.1.*.{rng.choice(leaves)}", rng.choice(leaves)],
        lambda: [rng.choice(leaves), EMBEDDING[arch]],
    ])()
    named = leaves if targets == "all-linear" else [t.rsplit(".", 1)[-1] for t in targets]
    config = pk.DoRA if rng.random() < 0.3 else pk.LoRA
    kw: dict[str, Any] = {"target_modules": targets, "rank": rng.choice([1, 2, 4]), "alpha": rng.choice([1, 4, 8]),
                          "use_rslora": rng.random() < 0.3, "task_type": TASK[arch]}
    if rng.random() < 0.3:
        kw["layers"] = [rng.randint(0, 1)]
    elif rng.random() < 0.3 and len(named) > 1:
        kw["exclude_modules"] = [f"*.0.*.{named[-1]}"]
    if rng.random() < 0.4:
        kw["rank_pattern"] = {f"*{rng.choice(named)}": rng.choice([1, 3])}
    if rng.random() < 0.4:
        kw["alpha_pattern"] = {rng.choice(named): rng.choice([2, 5])}
    if config is pk.LoRA and EMBEDDING[arch] not in named:
        kw["bias"] = rng.choice(["none", "lora_only", "all"])
        kw["lora_bias"] = rng.random() < 0.3
        if TASK[arch] == "CAUSAL_LM" and rng.random() < 0.3:
            kw["alora_invocation_tokens"] = rng.choice(INVOCATIONS)
    return config(**kw)


def draw_ours_other(rng: random.Random, arch: str) -> Any:
    """A random peftkit IA3, AdaLoRA, prompt, prefix or P-tuning config for ``arch``."""
    leaves, task = LEAVES[arch], TASK[arch]
    kind = rng.choice(["ia3", "adalora", "prompt", "prefix", "ptuning"])
    if kind == "prefix" and arch == "bert":
        kind = "prompt"  # (HF PEFT 0.21 cannot load prefix tuning on BERT under transformers 5)
    layers = {"layers": [rng.randint(0, 1)]} if rng.random() < 0.3 else {}
    if kind == "ia3":
        targets = rng.sample(leaves, rng.randint(1, len(leaves)))
        return pk.IA3(target_modules=targets, feedforward_modules=rng.sample(targets, rng.randint(0, len(targets))),
                      task_type=task, **layers)
    if kind == "adalora":
        return pk.AdaLoRA(target_modules=rng.sample(leaves, rng.randint(1, len(leaves))), init_rank=rng.choice([2, 4]),
                          target_rank=1, total_step=20, alpha=rng.choice([2, 8]), task_type=task, **layers)
    tokens = rng.choice([1, 3, 5])
    if kind == "prompt":
        return pk.PromptTuning(num_virtual_tokens=tokens, task_type=task)
    if kind == "prefix":
        return pk.PrefixTuning(num_virtual_tokens=tokens, task_type=task)
    return pk.PTuning(num_virtual_tokens=tokens, encoder_hidden_size=rng.choice([8, 16]), task_type=task,
                      encoder_reparameterization_type=rng.choice(["MLP", "LSTM"]))


def lora_config(rng: random.Random, arch: str) -> Any:
    return peft.LoraConfig(**draw(rng, arch))


#: (name, draw function, first seed, cases): HF PEFT configurations, then peftkit ones.
HF_CASES = [("lora", lora_config, 0, 40), ("other", draw_other, 1000, 40)]
OUR_CASES = [("lora", draw_ours, 2000, 32), ("other", draw_ours_other, 3000, 32)]


def cases(table: list[tuple[str, Any, int, int]]) -> list[Any]:
    return [pytest.param(draw_fn, start + i, id=f"{name}-{i}") for name, draw_fn, start, n in table for i in range(n)]


def case(draw_fn: Any, seed: int) -> tuple[str, Any]:
    """Case ``seed``: its architecture (in turn) and the configuration ``draw_fn`` draws for it."""
    arch = list(LEAVES)[seed % len(LEAVES)]
    return arch, draw_fn(random.Random(seed), arch)


@pytest.mark.parametrize("draw_fn,seed", cases(HF_CASES))
def test_random_hf_configs_round_trip(draw_fn: Any, seed: int, tmp_path) -> None:
    arch, config = case(draw_fn, seed)
    hf = peft.get_peft_model(build(arch), config)
    perturb(hf, seed)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        want = run(hf, arch)
    ours = pk.load_adapter(build(arch), tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(run(ours, arch), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")
    pk.save_adapter(ours, tmp_path / "pk")
    theirs = load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    # HF PEFT also writes the base embedding when an embedding is a target (save_embedding_layers="auto");
    # peftkit reads it but does not write the frozen table into the adapter.
    extra = {k for k in theirs.keys() - mine.keys() if k.endswith(f"{EMBEDDING[arch]}.base_layer.weight")}
    assert mine.keys() == theirs.keys() - extra, config
    for key, tensor in mine.items():
        assert torch.equal(tensor, theirs[key]), key
    assert_hf_loads(tmp_path / "pk", arch, want, config)


@pytest.mark.parametrize("draw_fn,seed", cases(OUR_CASES))
def test_random_peftkit_configs_load_in_hf_peft(draw_fn: Any, seed: int, tmp_path) -> None:
    arch, config = case(draw_fn, seed)
    ours = pk.apply(build(arch), config)
    perturb(ours, seed)
    with torch.no_grad():
        want = run(ours, arch)
    pk.save_adapter(ours, tmp_path)
    assert_hf_loads(tmp_path, arch, want, config)


def assert_hf_loads(directory: Any, arch: str, want: torch.Tensor, config: Any) -> None:
    """HF PEFT loads the adapter in ``directory`` onto a fresh model with the logits ``want``."""
    hf = peft.PeftModel.from_pretrained(build(arch), str(directory)).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(hf, arch), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")
