"""LayerNorm tuning: forward, merge, several adapters and files against HF PEFT's LN tuning on Llama and GPT-2."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterStateError, ConfigError, MergeError, UnsupportedLayerError
from peftkit.methods.ln_tuning import LNTuningLayer

from models import build, run, train_losses

peft = pytest.importorskip("peft")

#: arch → the norms HF PEFT's LN tuning adapts there by default (RMSNorm on Llama, LayerNorm with a bias on GPT-2).
DEFAULTS = {"llama": ["input_layernorm", "norm", "post_attention_layernorm"], "gpt2": ["ln_1", "ln_2", "ln_f"]}


def hf_ln(arch: str, seed: int = 0, **options: Any) -> Any:
    """HF PEFT's LN tuning on ``arch`` (default targets) with its copies moved off the base values."""
    hf = peft.get_peft_model(build(arch), peft.LNTuningConfig(**options)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_tuning_layers." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return hf


def copy_copies(hf: Any, model: nn.Module, name: str = "default") -> None:
    """HF PEFT's trained copies (adapter ``default``) into ``model``'s adapter ``name``."""
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in hf.state_dict().items():
            if ".ln_tuning_layers.default." in key:
                ours = key.removeprefix("base_model.model.").replace(".default.", f".{name}.")
                own[ours].copy_(value)


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return run(model, arch)


@pytest.mark.parametrize("arch", list(DEFAULTS))
def test_defaults_forward_and_parameters_match_hf_peft(arch: str) -> None:
    hf = hf_ln(arch)
    model = pk.apply(build(arch), pk.LNTuning())
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())
    assert set(model.state_dict()) == {k.removeprefix("base_model.model.") for k in hf.state_dict()}
    assert torch.equal(logits(model, arch), logits(build(arch), arch))  # copies start at the base values
    copy_copies(hf, model)
    expected = logits(hf, arch)
    assert not torch.allclose(expected, logits(build(arch), arch), atol=1e-3)
    assert torch.equal(logits(model, arch), expected)


@pytest.mark.parametrize("arch", list(DEFAULTS))
def test_files_cross_load_with_hf_peft_both_ways(arch: str, tmp_path) -> None:
    hf = hf_ln(arch)
    expected = logits(hf, arch)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    assert torch.equal(logits(loaded, arch), expected)

    model = pk.apply(build(arch), pk.LNTuning())
    copy_copies(hf, model)
    pk.save_adapter(model, tmp_path / "pk")
    shapes = [{k: tuple(v.shape) for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
              for d in (tmp_path / "pk", tmp_path / "hf")]
    assert shapes[0] == shapes[1] and all(".ln_tuning_layers." in k for k in shapes[0])
    written = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert written["peft_type"] == theirs["peft_type"] == "LN_TUNING"
    assert sorted(written["target_modules"]) == sorted(theirs["target_modules"]) == DEFAULTS[arch]
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    assert torch.equal(logits(back, arch), expected)


@pytest.mark.parametrize("arch", list(DEFAULTS))
def test_merge_unmerge_disable_and_unload(arch: str) -> None:
    model = pk.apply(build(arch), pk.LNTuning())
    copy_copies(hf_ln(arch), model)
    expected, base = logits(model, arch), logits(build(arch), arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pk.merge(model, safe=True)
    assert torch.equal(logits(model, arch), expected)
    with pk.disable_adapters(model):
        assert torch.equal(logits(model, arch), base)
    saved = {k: v for k, v in model.state_dict().items() if ".ln_tuning_layers." in k}
    assert all(torch.equal(v, before[k]) for k, v in saved.items())  # the copies keep the trained values
    pk.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = pk.unload(model, merge=True)
    assert not any(isinstance(m, LNTuningLayer) for m in plain.modules())
    assert torch.equal(logits(plain, arch), expected)


def test_one_adapter_per_layer_computes_and_merges_at_a_time() -> None:
    model = pk.apply(build("llama"), pk.LNTuning(), name="a")
    pk.apply(model, pk.LNTuning(target_modules=["norm"]), name="b")
    copy_copies(hf_ln("llama"), model, "a")
    with pytest.raises(AdapterStateError, match="one of them computes at a time"):
        pk.set_adapter(model, ["a", "b"])
    assert pk.active_adapters(model) == ["a"]
    with pytest.raises(MergeError, match="merge one"):
        pk.merge(model, ["a", "b"])
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LNTuningLayer))
    pk.set_adapter(model, "b")
    assert torch.equal(logits(model, "llama"), logits(build("llama"), "llama"))  # b's copy is untrained
    pk.delete_adapter(model, "b")
    pk.set_adapter(model, "a")
    assert torch.equal(logits(model, "llama"), logits(hf_ln("llama"), "llama"))


def test_errors() -> None:
    with pytest.raises(UnsupportedLayerError):  # Llama's activation has no parameters to copy
        pk.apply(build("llama"), pk.LNTuning(target_modules=["act_fn"]))
    with pytest.raises(ConfigError, match="no default target_modules"):
        pk.apply(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), pk.LNTuning())
    model = pk.apply(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), pk.LNTuning(target_modules=["1"]))
    assert pk.count_parameters(model)[0] == 6


def test_training_lowers_the_loss() -> None:
    model = build("llama").train()
    pk.apply(model, pk.LNTuning())
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    losses = train_losses(model, lambda: model(input_ids=ids, labels=ids).loss, lr=0.1)
    assert losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "qwen2"])
def test_omitted_targets_are_hf_peft_s_defaults(arch: str) -> None:
    hf = peft.get_peft_model(build(arch), peft.LNTuningConfig())
    model = pk.apply(build(arch), pk.LNTuning())
    adapted = {n for n, m in model.named_modules() if isinstance(m, LNTuningLayer)}
    assert adapted == set(hf.base_model.targeted_module_names) and adapted
