"""CorDA (``pk.LoRA(init="corda")`` then ``pk.init_corda``): factors and residual weights against HF PEFT's
``preprocess_corda`` + ``get_peft_model`` on the same model and data (Llama's ``nn.Linear``, GPT-2's ``Conv1D``; IPM and
KPM), the conversion to a plain adapter of the original model against HF PEFT's, files in both libraries, deleting,
and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import AdapterNotFoundError, ConfigError
from peftkit.methods.lora_corda import decompose

from models import assert_factors_match, assert_hf_conversion_matches, build, lora_layers, randomize_adapters

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402  (needs attrs, a test dependency)

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
#: One sample per call, as HF PEFT's covariance hook expects.
SAMPLES = [torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def ours(arch: str, method: str = "ipm", **kwargs: object) -> nn.Module:
    model = build(arch)
    pk.apply(model, pk.LoRA(target_modules=TARGETS[arch], rank=4, alpha=8, init="corda", **kwargs))  # type: ignore[arg-type]
    pk.init_corda(model, lambda: [model(s) for s in SAMPLES], method=method, show_progress=False)
    return model


def theirs(arch: str, method: str = "ipm", **kwargs: object) -> nn.Module:
    model = build(arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=method), **kwargs)
    preprocess_corda(model, config, run_model=lambda: [model(s) for s in SAMPLES])
    return peft.get_peft_model(model, config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------------ HF PEFT parity


@pytest.mark.parametrize("arch,method,kwargs", [
    ("llama", "ipm", {}),
    ("llama", "kpm", {"rank_pattern": {"down_proj": 2}}),
    ("gpt2", "ipm", {}),
    ("gpt2", "kpm", {}),
])
def test_factors_and_residual_equal_hf_peft_and_output_is_unchanged(arch: str, method: str, kwargs: dict) -> None:
    model, hf, base = ours(arch, method, **kwargs), theirs(arch, method, **kwargs), build(arch)
    original = dict(base.named_modules())
    for qualname, layer in lora_layers(model):
        other = hf.base_model.model.get_submodule(qualname)
        A, B = assert_factors_match(layer, other)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=1e-5, atol=1e-6)
        delta = layer.delta_weight("default")
        assert delta.abs().max() > 1e-3 and A.shape[0] == (2 if "down_proj" in qualname and kwargs else 4)
        torch.testing.assert_close(layer.kind.weight(layer.base_layer) + delta, layer.kind.weight(original[qualname]),
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-5)


def test_ipm_and_kpm_keep_the_largest_and_the_smallest_context_oriented_triplets() -> None:
    """All triplets give W back (``W C = U S Vᵀ`` and ``V' = C⁻¹ V``); IPM keeps the r largest, KPM the r smallest."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    covariance = x.t() @ x / 40
    U, S, V = decompose(weight, covariance, 6, "ipm")
    torch.testing.assert_close(U @ torch.diag(S) @ V.t(), weight, rtol=0, atol=1e-4)
    _, top, _ = decompose(weight, covariance, 2, "ipm")
    _, bottom, _ = decompose(weight, covariance, 2, "kpm")
    assert torch.equal(top, S[:2]) and torch.equal(bottom, S[-2:]) and bool((S[:-1] >= S[1:]).all())


def test_progress_is_shown_and_the_mode_restored(capsys: pytest.CaptureFixture[str]) -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=2, init="corda")).train()
    pk.init_corda(model, lambda: model(SAMPLES[0]))
    assert model.training and "CorDA" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ files and the residual


def test_converted_adapter_equals_hf_peft_conversion_and_loads_in_both(tmp_path: Path) -> None:
    model = ours("llama")
    randomize_adapters(model, seed=1)  # a trained adapter
    want = logits(model)
    pk.save_adapter(model, tmp_path / "pk", convert_to_lora=True)

    assert_hf_conversion_matches(theirs("llama"), model, "corda", tmp_path, atol=1e-5)

    for directory in ("pk", "hf"):  # a plain rank-2r adapter of the original model, in either library
        torch.testing.assert_close(logits(pk.load_adapter(build("llama"), tmp_path / directory)), want,
                                   rtol=0, atol=1e-5)
        hf_plain = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / directory)).eval()
        torch.testing.assert_close(logits(hf_plain), want, rtol=0, atol=1e-5)


def test_saved_adapter_records_corda_and_loads_on_the_residual_model(tmp_path: Path) -> None:
    """As HF PEFT's file: ``init_lora_weights: "corda"`` with ``corda_config``; the factors load unchanged onto the
    residual model (``pk.unload(model, merge=False)``), in peftkit, and HF PEFT's own file likewise."""
    model = ours("llama", "kpm")
    randomize_adapters(model, seed=1)
    want = logits(model)
    pk.save_adapter(model, tmp_path / "pk")
    config = json.loads((tmp_path / "pk" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "corda" and config["corda_config"] == {"corda_method": "kpm"}
    hf = theirs("llama", "kpm")
    hf.base_model.model.load_state_dict(model.state_dict())
    hf.save_pretrained(str(tmp_path / "hf"))
    for directory in ("pk", "hf"):
        residual = pk.unload(ours("llama", "kpm"), merge=False)
        torch.testing.assert_close(logits(pk.load_adapter(residual, tmp_path / directory)), want, rtol=0, atol=1e-5)


def test_merge_and_delete() -> None:
    model = ours("llama")
    randomize_adapters(model, seed=1)
    want = logits(model)
    pk.merge(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    pk.unmerge(model)
    pk.delete_adapter(model, "default")  # s·B₀A₀ goes back into the base weight: the original model again
    torch.testing.assert_close(logits(model), logits(build("llama")), rtol=0, atol=1e-5)
    for name, module in build("llama").named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(model.get_submodule(name).weight, module.weight, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ refusals


def corda_model() -> nn.Module:
    return pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=4, init="corda"))


def initialised() -> nn.Module:
    model = corda_model()
    pk.init_corda(model, lambda: model(SAMPLES[0]), show_progress=False)
    return model


@pytest.mark.parametrize("make,run,kwargs,error,match", [
    (lambda: build("llama"), lambda: None, {}, AdapterNotFoundError,
     r"no adapter named 'default' on this model \(its adapters: none\); first pk.apply"),
    (lambda: pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], init="eva")), lambda: None, {}, ConfigError,
     r"adapter 'default' has init='eva'; CorDA initialises an adapter applied with pk.LoRA\(init='corda'"),
    (corda_model, lambda: None, {"method": "pissa"}, ConfigError, r"method='pissa' must be 'ipm' .* or 'kpm'"),
    (corda_model, "batches", {}, ConfigError, r"run_model='batches' must be a function that runs the model"),
    (corda_model, lambda: None, {}, ConfigError,
     r"run_model never ran 'model.layers.0.self_attn.q_proj' \(2 of 2 target layers had no input\)"),
    (initialised, lambda: None, {}, ConfigError,
     r"adapter 'default' was already initialised by CorDA \('model.layers.0.self_attn.q_proj' holds its residual"),
])
def test_bad_input_is_refused_before_the_model_changes(make: object, run: object, kwargs: dict, error: type,
                                                       match: str) -> None:
    model = make()  # type: ignore[operator]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        pk.init_corda(model, run, show_progress=False, **kwargs)  # type: ignore[arg-type]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())


def test_invalid_inputs_and_configs_are_refused() -> None:
    model = pk.apply(nn.Sequential(nn.Linear(4, 4)), pk.LoRA(target_modules=["0"], rank=2, init="corda"))
    weight = model[0].base_layer.weight.clone()
    with pytest.raises(ConfigError, match=r"the input of '0' has NaN or infinite values \(or is all zero\)"):
        pk.init_corda(model, lambda: model(torch.zeros(3, 4)), show_progress=False)
    assert torch.equal(model[0].base_layer.weight, weight)
    with pytest.raises(ConfigError, match=r"DoRA does not support init='corda'; use pk.LoRA"):
        pk.DoRA(target_modules=["q_proj"], init="corda")
    with pytest.raises(ConfigError, match=r"init='corda' supports linear-like layers only"):
        pk.apply(build("llama"), pk.LoRA(target_modules=["embed_tokens"], init="corda"))
    with pytest.raises(ConfigError, match=r"init='corda' takes 64 directions of 'model.layers.0.self_attn.q_proj''s "
                                          r"weight, which has only 32"):
        pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank_pattern={"q_proj": 64}, init="corda"))
