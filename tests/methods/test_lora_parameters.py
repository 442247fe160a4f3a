"""LoRA on parameters (HF PEFT's ``target_parameters``): the expert stacks of mixture-of-experts models.

The per-expert formula against an explicit loop (both storage orders), HF PEFT parity both ways on the MoE
architectures transformers stores as 3-D parameters (outputs, gradients, state-dict keys, configs), merging,
several adapters, and every refusal before the model changes.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.methods.lora_layers import LoRALinear
from peftkit.methods.lora_params import LoRAParameter

from models import randomize_adapters

peft = pytest.importorskip("peft")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64)
#: Architecture → (config class, model class, MoE fields). GPT-OSS stores its experts as (E, in, out).
MOES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[])),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                     layer_types=["full_attention", "full_attention"])),
}
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def moe(arch: str = "mixtral", seed: int = 0) -> nn.Module:
    config_cls, model_cls, fields = MOES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**COMMON, **fields)
    return getattr(transformers, model_cls)(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def lora(**kwargs: Any) -> pk.LoRA:
    return pk.LoRA(**{"target_parameters": EXPERTS, "rank": 4, "alpha": 8, **kwargs})


def adapted(arch: str = "mixtral", seed: int = 1, **kwargs: Any) -> nn.Module:
    model = pk.apply(moe(arch), lora(**kwargs))
    randomize_adapters(model, seed)
    return model


def hf_lora(**kwargs: Any) -> Any:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": [], "target_parameters": EXPERTS,
                              "init_lora_weights": False, **kwargs})


# -- the formula ------------------------------------------------------------------------------------------
class Stack(nn.Module):
    """A mixture of E linear experts over one weight stack; expert e maps x[e] (tokens × in) to tokens × out."""

    def __init__(self, experts: int, d_in: int, d_out: int, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, d_in, d_out) if transposed else (experts, d_out, d_in)
        self.weight_stack = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_stack if self.is_transposed else self.weight_stack.transpose(1, 2)
        return torch.bmm(x, w)


@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_its_own_packed_factors(transposed: bool) -> None:
    """W_e + s·B_e A_e with A_e = A[e·r:(e+1)·r] and B_e = B[:, e::E], (B_e A_e)ᵀ for an (E, in, out) stack."""
    E, d_in, d_out, r = 3, 5, 7, 2
    model = nn.Sequential(Stack(E, d_in, d_out, transposed))
    pk.apply(model, pk.LoRA(target_parameters=["weight_stack"], rank=r, alpha=6))
    randomize_adapters(model)
    layer = model[0]
    assert isinstance(layer, LoRAParameter) and layer.num_experts == E
    A, B = layer.factor_weights("default")
    assert A.shape == (E * r, d_in) and B.shape == (d_out, r * E)
    x = torch.randn(E, 4, d_in)
    expected = []
    for e in range(E):
        W_e = layer.parameter[e].T if transposed else layer.parameter[e]  # (out, in)
        delta = 3.0 * B[:, e::E] @ A[e * r:(e + 1) * r]
        expected.append(x[e] @ (W_e + delta).T)
    torch.testing.assert_close(model(x), torch.stack(expected))


def test_a_two_dimensional_parameter_is_one_expert() -> None:
    base = nn.Sequential(nn.Linear(6, 5))
    model = pk.apply(copy.deepcopy(base), pk.LoRA(target_parameters=["0.weight"], rank=2, alpha=4))
    randomize_adapters(model)
    A, B = model[0].factor_weights("default")
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), base(x) + 2.0 * x @ A.T @ B.T)


# -- HF PEFT both ways --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(MOES))
def test_matches_hf_peft_both_ways(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    theirs = peft.get_peft_model(moe(arch), hf_lora()).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = pk.load_adapter(moe(arch), tmp_path / "hf")
    expected = logits(theirs)
    assert (expected - logits(moe(arch))).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(ours), expected)

    pk.save_adapter(ours, tmp_path / "pk")
    assert load_file(tmp_path / "pk" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "hf" / "adapter_model.safetensors").keys()
    written = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == sorted(EXPERTS) and written["target_modules"] == []
    again = peft.PeftModel.from_pretrained(moe(arch), tmp_path / "pk").eval()
    torch.testing.assert_close(logits(again), expected)


def test_state_dict_keys_and_gradients_match_hf_peft() -> None:
    torch.manual_seed(5)
    theirs = peft.get_peft_model(moe(), hf_lora())
    ours = pk.apply(moe(), lora())
    hf_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if "lora_" in key:
                value.copy_(hf_state.pop(key))
    assert not hf_state  # every HF PEFT adapter tensor has the same key in peftkit
    losses = [model.train()(IDS, labels=IDS).loss for model in (theirs, ours)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    hf_grads = {k.removeprefix("base_model.model."): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert hf_grads.keys() == ours_grads.keys() and len(ours_grads) == 8
    for key, grad in ours_grads.items():
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, hf_grads[key], msg=key)


def test_rank_pattern_on_a_parameter_matches_hf_peft(tmp_path: Path) -> None:
    torch.manual_seed(5)
    theirs = peft.get_peft_model(moe(), hf_lora(rank_pattern={"experts.down_proj": 2},
                                                alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 3})).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = pk.load_adapter(moe(), tmp_path / "hf")
    torch.testing.assert_close(logits(ours), logits(theirs))
    layer = ours.model.layers[1].mlp.experts
    assert layer.rank["default"] == 2 and layer.base_layer.scaling["default"] == 3 / 4
    pk.save_adapter(ours, tmp_path / "pk")
    again = peft.PeftModel.from_pretrained(moe(), tmp_path / "pk").eval()
    torch.testing.assert_close(logits(again), logits(theirs))


def test_parameters_beside_module_targets_and_a_glob(tmp_path: Path) -> None:
    """Attention modules and expert parameters in one adapter; a glob selects block 1's experts only, and HF PEFT
    reads them from the exact keys written."""
    model = adapted(target_modules=["q_proj"], target_parameters=["*.layers.1.*.gate_up_proj", "*.1.*.down_proj"])
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["default"]
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRAParameter)]
    assert wrapped == ["model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer"]
    pk.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["model.layers.1.mlp.experts.gate_up_proj",
                                            "model.layers.1.mlp.experts.down_proj"]
    theirs = peft.PeftModel.from_pretrained(moe(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(model))


def test_exclusions_and_layers_leave_parameters_alone_as_in_hf_peft(tmp_path: Path) -> None:
    torch.manual_seed(5)
    theirs = peft.get_peft_model(moe(), hf_lora(target_modules=["q_proj"], layers_to_transform=[1],
                                                exclude_modules=["model.layers.0.mlp.experts"])).eval()
    theirs.save_pretrained(tmp_path)
    ours = pk.load_adapter(moe(), tmp_path)
    assert isinstance(ours.model.layers[0].mlp.experts, LoRAParameter)
    assert not isinstance(ours.model.layers[0].self_attn.q_proj, LoRALinear)
    torch.testing.assert_close(logits(ours), logits(theirs))
    mine = pk.apply(moe(), lora(target_modules=["q_proj"], layers=[1], exclude_modules=["model.layers.0.mlp.experts"]))
    assert {n for n, m in mine.named_modules() if isinstance(m, LoRAParameter)} == \
        {n for n, m in ours.named_modules() if isinstance(m, LoRAParameter)}


# -- the adapter's life ----------------------------------------------------------------------------------
def test_merge_unmerge_unload_and_disable() -> None:
    base = logits(moe())
    model = adapted()
    out = logits(model)
    with pk.disable_adapters(model):
        torch.testing.assert_close(logits(model), base)
    pk.merge(model)
    torch.testing.assert_close(logits(model), out, atol=1e-5, rtol=1e-5)
    pk.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.experts.parameter, moe().model.layers[0].mlp.experts.down_proj,
                               atol=1e-6, rtol=1e-6)
    plain = pk.unload(model, merge=True)
    assert not any(isinstance(m, LoRAParameter) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(plain), out, atol=1e-5, rtol=1e-5)


def test_several_adapters_share_the_wrappers() -> None:
    model = adapted()
    pk.apply(model, lora(), name="second")
    randomize_adapters(model, seed=7)
    alone = {}
    for name in ("default", "second"):
        pk.set_adapter(model, name)
        alone[name] = logits(model)
    assert (alone["default"] - alone["second"]).abs().max() > 1e-3
    outer = model.model.layers[0].mlp.experts
    assert outer.adapter_names == ["default", "second"] and outer.base_layer.adapter_names == ["default", "second"]
    pk.delete_adapter(model, "default")
    torch.testing.assert_close(logits(model), alone["second"])
    pk.delete_adapter(model, "second")
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(model), logits(moe()))


def test_inspect_lists_each_parameter() -> None:
    report = pk.inspect(moe(), lora())
    rows = {row.name: row for row in report.rows}
    row = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert row.shape == (4, 128, 32) and row.added_params == 4 * 4 * (32 + 128)
    assert report.added_params == sum(p.numel() for p in pk.apply(moe(), lora()).parameters() if p.requires_grad)


# -- refusals, before anything changes ------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dropout": 0.1}, "dropout=0.1 cannot be used with target_parameters"),
    ({"lora_bias": True}, "lora_bias=True cannot be used with target_parameters"),
    ({"target_parameters": [""]}, "must be a list of parameter names"),
    ({"init": "pissa"}, "init='pissa' cannot initialise target_parameters"),
])
def test_config_refusals(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lora(**kwargs)


def test_dora_cannot_adapt_parameters() -> None:
    with pytest.raises(ConfigError, match="DoRA cannot adapt parameters"):
        pk.DoRA(target_parameters=EXPERTS)


@pytest.mark.parametrize(("config", "error", "message"), [
    (lora(target_parameters=["experts.gate_proj"]), TargetNotFoundError,
     r"closest parameters: \['experts.gate_up_proj', 'experts.down_proj'\]"),
    (lora(target_parameters=["input_layernorm.weight"]), ConfigError, "3-D expert stacks"),
    (lora(target_parameters=["q_proj.weight"], target_modules=["q_proj"]), ConfigError, "module targets and hold"),
    (lora(modules_to_save=["experts"]), ConfigError, r"'model.layers.0.mlp.experts.gate_up_proj' lies inside "
                                                     r"'model.layers.0.mlp.experts', which modules_to_save"),
    (lora(modules_to_save=["mlp"]), ConfigError, r"lies inside 'model.layers.0.mlp', which modules_to_save=\['mlp'\]"),
])
def test_bad_targets_leave_the_model_unchanged(config: pk.LoRA, error: type[Exception], message: str) -> None:
    model = moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        pk.apply(model, config)
    assert model.state_dict().keys() == before.keys() and not pk.list_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (LoRAParameter, ModulesToSave)) for m in model.modules())


def test_a_model_without_expert_stacks_says_so() -> None:
    """Suggestions are entries that would work (a module and its parameter), never a bare ``weight``."""
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with pytest.raises(TargetNotFoundError, match=r"closest parameters: \[[^]]*'gate_proj.weight'[^]]*\]; it has no "
                                                  r"3-D expert stacks \(adapt its linear layers with target_modules\)"):
        pk.apply(dense, lora())


def test_a_pattern_on_the_module_that_holds_the_parameters_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """As in HF PEFT a parameter's rank is looked up by its key; a key naming only its module changes nothing."""
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        model = pk.apply(moe(), lora(rank_pattern={"experts": 2, "experts.down_proj": 6}))
    assert ("rank_pattern key 'experts' matches the modules holding the target parameters, not the parameters: it "
            "changes nothing. Name the parameters, e.g. 'experts.gate_up_proj'") in caplog.text
    assert "experts.down_proj" not in caplog.text
    experts = model.model.layers[0].mlp.experts
    assert (experts.rank, experts.base_layer.rank) == ({"default": 6}, {"default": 4})


def test_a_second_adapter_must_adapt_the_same_parameters() -> None:
    model = adapted()
    with pytest.raises(ConfigError, match="must adapt the same ones"):
        pk.apply(model, lora(target_parameters=["experts.down_proj"]), name="other")
    assert pk.list_adapters(model) == ["default"]
    assert model.model.layers[0].mlp.experts.adapter_names == ["default"]


@pytest.mark.parametrize("operation", ["combine", "prune", "convert"])
def test_arithmetic_refuses_parameter_adapters(operation: str) -> None:
    model = adapted()
    with pytest.raises(ConfigError, match="adapts parameters"):
        if operation == "combine":
            pk.combine(model, {"default": 1.0}, method="cat", name="mix")
        elif operation == "prune":
            pk.prune(model, "default", method="rank", energy=0.9)
        else:
            pk.convert(model, to="canonical")
