"""Adaption prompts (LLaMA-Adapter) against HF PEFT: initialisation, forward with non-zero gates, cached generation,
gradients, files both ways, several adapters and errors, on tiny Llama, Mistral and GPT-2 models."""

from __future__ import annotations

import json

import pytest
import torch
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.adaption_prompt import AdaptionPromptLayer

from models import build, qwen2

peft = pytest.importorskip("peft")

ARCHS = ["llama", "mistral", "gpt2"]


def hf_model(arch: str, seed: int = 5, **fields: int) -> torch.nn.Module:
    config = peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **{"adapter_len": 3, "adapter_layers": 2, **fields})
    base = build(arch)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config).eval()


def ours_model(arch: str, seed: int = 5, **fields: int) -> torch.nn.Module:
    base = build(arch)
    torch.manual_seed(seed)
    return pk.apply(base, pk.AdaptionPrompt(**{"adapter_len": 3, "adapter_layers": 2, **fields}))


def ours_key(hf_name: str, adapter: str = "default") -> str:
    """HF PEFT's parameter name as peftkit's (its tensors are keyed by adapter name)."""
    return f"{hf_name.removeprefix('base_model.model.')}.{adapter}"


def randomize_both(hf: torch.nn.Module, ours: torch.nn.Module, seed: int = 0, adapter: str = "default") -> None:
    """The same random prompts and (non-zero) gates in both models (HF PEFT's active adapter, peftkit's
    ``adapter``)."""
    gen = torch.Generator().manual_seed(seed)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "adaption_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
                mine[ours_key(name, adapter)].copy_(p)


@pytest.mark.parametrize("arch", ARCHS)
def test_initialisation_and_trainable_tensors_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    want = {ours_key(n): p for n, p in hf.named_parameters() if p.requires_grad}
    got = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(want)
    for name, p in want.items():
        assert torch.equal(got[name], p), name  # the same draws from the global generator, in the same order
    assert all(torch.equal(p, torch.zeros(1)) for n, p in got.items() if "gate" in n)
    inputs = batch(arch)
    with torch.no_grad():  # a zero gate leaves the model as it was
        assert torch.equal(ours(**inputs).logits, build(arch)(**inputs).logits)
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_hf_with_nonzero_gates(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    randomize_both(hf, ours)
    inputs = batch(arch)
    with torch.no_grad():
        want, got = hf(**inputs), ours(**inputs)
        base = build(arch)(**inputs).logits
    assert not torch.allclose(want.logits, base, atol=1e-3)  # the prompts do change the output
    assert torch.allclose(got.logits, want.logits, atol=1e-6)
    assert torch.allclose(got.loss, want.loss, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    randomize_both(hf, ours)
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    args = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
            "pad_token_id": 0}
    want, got = hf.generate(**inputs, **args), ours.generate(**inputs, **args)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_gradients_and_a_training_step_equal_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    randomize_both(hf, ours)
    inputs = batch("llama")
    hf(**inputs).loss.backward()
    ours(**inputs).loss.backward()
    mine = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.allclose(mine[ours_key(name)].grad, p.grad, atol=1e-6), name
    assert all(p.grad is None for n, p in ours.named_parameters() if "adaption_" not in n)
    for model in (hf, ours):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_files_load_both_ways_with_equal_logits(arch: str, tmp_path) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    randomize_both(hf, ours, seed=7)
    inputs = batch(arch)
    with torch.no_grad():
        want = hf(**inputs).logits
    hf.save_pretrained(str(tmp_path / "hf"))
    pk.save_adapter(ours, tmp_path / "pk")

    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    hf_config.pop("peft_version")
    assert our_config == hf_config
    from safetensors.torch import load_file

    hf_tensors, our_tensors = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "pk"))
    assert sorted(our_tensors) == sorted(hf_tensors)
    assert all(torch.equal(our_tensors[k], hf_tensors[k]) for k in hf_tensors)

    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)
        assert torch.equal(back(**inputs).logits, want)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference unless trainable=True


def test_several_adapters_switch_disable_and_delete_as_in_hf(tmp_path) -> None:
    hf, ours = hf_model("llama", adapter_layers=1), ours_model("llama", adapter_layers=1)
    torch.manual_seed(1)
    hf.add_adapter("other", peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    pk.apply(ours, pk.AdaptionPrompt(adapter_len=4, adapter_layers=2), name="other")
    assert pk.active_adapters(ours) == ["default"] and hf.active_adapters == ["default"]
    hf.set_adapter("other")
    randomize_both(hf, ours, adapter="other")  # HF PEFT's model holds the active adapter's modules only
    hf.set_adapter("default")
    randomize_both(hf, ours, seed=1)
    inputs, base = batch("llama"), build("llama")
    with torch.no_grad():
        for name in ("default", "other"):
            hf.set_adapter(name)
            pk.set_adapter(ours, name)
            assert torch.allclose(ours(**inputs).logits, hf(**inputs).logits, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, base(**inputs).logits)

    pk.save_adapter(ours, tmp_path)  # "default" in the directory, "other" in other/
    back = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    back.load_adapter(str(tmp_path / "other"), adapter_name="other")
    back.set_adapter("other")
    with torch.no_grad():
        assert torch.allclose(back(**inputs).logits, ours(**inputs).logits, atol=1e-6)

    pk.delete_adapter(ours, "other")
    assert isinstance(ours.model.layers[1].self_attn, AdaptionPromptLayer)
    assert not isinstance(ours.model.layers[0].self_attn, AdaptionPromptLayer)  # only "other" adapted block 0
    pk.delete_adapter(ours, "default")
    assert type(ours.model.layers[1].self_attn).__name__ == "LlamaAttention"


def test_active_adapters_add_their_terms() -> None:
    """Several active adapters (HF PEFT activates one at a time) add their gated terms to the attention output."""
    model = ours_model("llama", adapter_layers=1)
    pk.apply(model, pk.AdaptionPrompt(adapter_len=2, adapter_layers=1), name="b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaption_" in name:
                p.copy_(torch.randn_like(p))
    outputs: list[torch.Tensor] = []
    attention = model.model.layers[1].self_attn
    handle = attention.register_forward_hook(lambda mod, args, out: outputs.append(out[0]))
    inputs = batch("llama")
    with torch.no_grad():
        for names in (["default"], ["b"], ["default", "b"]):
            pk.set_adapter(model, names)
            model(**inputs)
        with pk.disable_adapters(model):
            model(**inputs)
    handle.remove()
    a, b, both, base = outputs
    assert torch.allclose(both - base, (a - base) + (b - base), atol=1e-6)


def test_heads_times_head_size_other_than_the_hidden_size() -> None:
    """HF PEFT counts key/value heads as hidden size over k_proj's output and fails on such a model; peftkit counts
    them from k_proj's output and the head size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=96)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    inputs = batch("llama")
    with torch.no_grad():
        want = base(**inputs).logits
        model = pk.apply(base, pk.AdaptionPrompt(adapter_len=3, adapter_layers=1))
        assert torch.equal(model(**inputs).logits, want)
        model.model.layers[1].self_attn.adaption_gate["default"].fill_(1.0)
        assert not torch.allclose(model(**inputs).logits, want, atol=1e-3)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="adapter_layers=3 is more than the 2 'self_attn' modules"):
        pk.apply(build("llama"), pk.AdaptionPrompt(adapter_len=2, adapter_layers=3))
    with pytest.raises(ConfigError, match="model types .*'qwen2'"):
        pk.apply(qwen2(), pk.AdaptionPrompt(adapter_len=2, adapter_layers=1))
    with pytest.raises(ConfigError, match="adapter_len=0 must be a positive integer"):
        pk.AdaptionPrompt(adapter_layers=1)
    with pytest.raises(ConfigError, match="one attention module name"):
        pk.AdaptionPrompt(adapter_len=2, adapter_layers=1, target_modules=["q_proj", "v_proj"])
    with pytest.raises(TargetNotFoundError, match="self_atn"):
        pk.apply(build("llama"), pk.AdaptionPrompt(adapter_len=2, adapter_layers=1, target_modules="self_atn"))

    model = ours_model("llama")
    randomize_both(hf_model("llama"), model)
    inputs = batch("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.merge(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.unload(model, merge=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    plain = pk.unload(model, merge=False)
    assert type(plain.model.layers[1].self_attn).__name__ == "LlamaAttention"


def test_the_command_line_trains_and_evaluates_adaption_prompts(tmp_path, capsys) -> None:
    import yaml
    from tests.train.conftest import LLAMA, WORDS, write_jsonl

    from peftkit.cli.main import main

    rows = [{"instruction": "Repeat", "input": w, "output": w} for w in WORDS * 2]
    cfg = {"model": {"task": "causal_lm"},
           "checkpoint": {"pretrained": {"config": dict(LLAMA)}, "save_dir": str(tmp_path / "run")},
           "peft": {"method": "adaption_prompt", "adapter_len": 4, "adapter_layers": 1},
           "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", rows)), "max_length": 64, "eval_fraction": 0.25},
           "train": {"max_steps": 2, "batch_size": 4, "seed": 0}, "optimizer": {"lr": 0.01},
           "scheduler": {"name": "constant"}, "eval": {"max_new_tokens": 2, "max_batches": 1},
           "logging": {"progress_bar": False, "plots": False, "tensorboard": "false"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
    assert main(["eval", "-p", str(final)]) == 0
    assert "adapted" in capsys.readouterr().out
