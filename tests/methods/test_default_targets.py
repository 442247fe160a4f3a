"""LoRA, AdaLoRA and IA3 without ``target_modules``: HF PEFT's per-architecture defaults, recorded in the config."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.layer import AdapterLayer
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import get_state
from peftkit.errors import ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "vocab_size": 96}
MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, num_key_value_heads=2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=96)),
    "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**_SMALL)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL, num_key_value_heads=2)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **_SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
METHODS: dict[str, tuple[Callable[[], pk.AdapterConfig], Callable[[], Any], str]] = {
    "lora": (lambda: pk.LoRA(), lambda: peft.LoraConfig(), "lora_A"),
    "adalora": (lambda: pk.AdaLoRA(total_step=10), lambda: peft.AdaLoraConfig(total_step=10), "lora_E"),
    "ia3": (lambda: pk.IA3(), lambda: peft.IA3Config(), "ia3_l"),
}


def _hf(arch: str, method: str) -> tuple[set[str], Any]:
    """The modules HF PEFT adapts (by name) and its resolved config."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(MODELS[arch](), METHODS[method][1]())
    attr, prefix = METHODS[method][2], "base_model.model."
    adapted = {n.removeprefix(prefix) for n, m in model.named_modules() if hasattr(m, attr)}
    return adapted, model.peft_config["default"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", [a for a in MODELS if a != "phi3"])
def test_omitted_targets_are_hf_peft_defaults_and_recorded(arch, method, tmp_path):
    hf_adapted, hf_config = _hf(arch, method)
    config = METHODS[method][0]()
    model = pk.apply(MODELS[arch](), config)
    ours = {n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and not isinstance(m, ModulesToSave)}
    assert ours == hf_adapted and ours
    recorded = get_state(model).configs["default"]
    assert sorted(recorded.target_modules) == sorted(hf_config.target_modules)
    if method == "ia3":
        assert sorted(recorded.feedforward_modules) == sorted(hf_config.feedforward_modules)
        hf_feedforward = {n for n in hf_adapted if first_layer(n, hf_config.feedforward_modules)}
        assert {n for n in ours if model.get_submodule(n).is_feedforward} == hf_feedforward
    assert list(config.target_modules) == []  # the user's config is not changed: reusable on other models
    pk.save_adapter(model, tmp_path)  # the file names the modules: HF PEFT adapts the same ones from it
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(MODELS[arch](), str(tmp_path))
    attr = METHODS[method][2]
    assert {n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if hasattr(m, attr)} == ours


def first_layer(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_architecture_without_defaults_is_refused_as_in_hf_peft(method):
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        _hf("phi3", method)
    model = MODELS["phi3"]()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ConfigError, match=r"has no default target_modules for model_type='phi3'; pass target_modules="
                                          r"\[\.\.\.\].*its linear layers: down_proj, gate_up_proj, lm_head, o_proj, "
                                          r"qkv_proj\) or 'all-linear'"):
        pk.apply(model, METHODS[method][0]())
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_the_ia3_error_asks_for_feedforward_modules_and_a_plain_module_names_its_class():
    with pytest.raises(ConfigError, match=r"IA3 has no default target_modules for Sequential \(it has no "
                                          r"config.model_type\); pass target_modules=\[\.\.\.\] and "
                                          r"feedforward_modules=\[\.\.\.\].*its linear layers: 0, 2\)"):
        pk.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), pk.IA3())
    with pytest.raises(ConfigError, match=r"DoRA has no default target_modules"):
        pk.inspect(nn.Sequential(nn.Linear(4, 4)), pk.DoRA())


def test_inspect_and_given_targets(tmp_path: Path):
    model = MODELS["llama"]()
    report = pk.inspect(model, pk.LoRA())
    assert {r.name.rsplit(".", 1)[-1] for r in report.rows} == {"q_proj", "v_proj"}
    pk.apply(model, pk.IA3(target_modules=["q_proj"]))  # given targets: no feedforward default is added
    assert list(get_state(model).configs["default"].feedforward_modules) == []


@pytest.mark.parametrize(("arch", "targets", "feedforward"), [
    ("llama", ["k_proj", "v_proj", "down_proj"], None),  # the architecture's feed-forward projection, as in HF PEFT
    ("llama", ["k_proj", "v_proj", "down_proj"], []),  # explicitly none
    ("llama", ["q_proj", "v_proj"], None),  # the default names no target: none
    ("gpt2", ["c_attn", "mlp.c_proj"], None),
])
def test_ia3_feedforward_defaults_with_given_targets_follow_hf_peft(arch, targets, feedforward, tmp_path):
    torch.manual_seed(0)
    base = MODELS[arch]()
    torch.manual_seed(0)  # the same weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(MODELS[arch](), peft.IA3Config(target_modules=targets,
                                                                feedforward_modules=feedforward))
    scaled_inputs = {n.removeprefix("base_model.model.") for n, m in hf.named_modules()
                     if hasattr(m, "is_feedforward") and m.is_feedforward}
    config = pk.IA3(target_modules=targets, feedforward_modules=feedforward)
    ours = pk.apply(base, config)
    assert config.feedforward_modules == feedforward  # the user's config is left as given
    assert {n for n, m in ours.named_modules() if getattr(m, "is_feedforward", False)} == scaled_inputs
    assert (arch == "llama" and targets[0] == "k_proj" and feedforward is None) <= bool(scaled_inputs)
    with torch.no_grad():  # non-trivial scaling vectors, the same in both
        theirs = {n.removeprefix("base_model.model."): q for n, q in hf.named_parameters() if "ia3_l" in n}
        ours_ia3 = {n: p for n, p in ours.named_parameters() if "ia3_l" in n}
        assert ours_ia3.keys() == theirs.keys()
        for name, p in ours_ia3.items():
            p.copy_(torch.rand_like(p) + 0.5)
            theirs[name].copy_(p)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = {"decoder_input_ids": ids} if arch == "t5" else {}
    with torch.no_grad():  # (evaluation mode: GPT-2's dropout)
        assert torch.allclose(ours.eval()(input_ids=ids, **kwargs).logits, hf.eval()(input_ids=ids, **kwargs).logits,
                              atol=1e-5)
    pk.save_adapter(ours, tmp_path)  # the file names what was decided; loading it in either library agrees
    loaded = pk.load_adapter(MODELS[arch](), tmp_path)
    assert {n for n, m in loaded.named_modules() if getattr(m, "is_feedforward", False)} == scaled_inputs
