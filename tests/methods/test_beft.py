"""BEFT against HF PEFT: initialisation, forward, gradients, files both ways, merging into the bias, several adapters,
half-precision and quantized bases, and refusals, on a tiny BERT (biased linears) and Llama (bias-free)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, UnsupportedLayerError
from peftkit.methods.beft import BEFTLayer
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_cross_load,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    assert_same_tensors_as_hf,
    build,
    check_two_adapters_as_hf,
    randomize_trainable,
    run,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

BERT: dict[str, Any] = {"target_modules": ["query", "value", "intermediate.dense"]}
LLAMA: dict[str, Any] = {"target_modules": ["q_proj", "v_proj", "down_proj"]}


def copy_from_hf(ours: torch.nn.Module, hf: Any) -> None:
    """HF PEFT's adapter and head-copy tensors into ``ours`` (peftkit names a head's copies ``copies``)."""
    state = {k.removeprefix("base_model.model.").replace(".modules_to_save.", ".copies."): v
             for k, v in hf.state_dict().items()}
    with torch.no_grad():
        ours.load_state_dict(state, strict=False)
    assert torch.equal(run(ours, "bert" if hasattr(ours, "bert") else "llama"),
                       run(hf, "bert" if hasattr(ours, "bert") else "llama"))


def hf_model(arch: str, seed: int = 3, **fields: Any) -> Any:
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"  # HF PEFT trains BERT's classifier, as peftkit does
    base = build(arch)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.BeftConfig(task_type=task, **fields)).eval()


def ours_model(arch: str, seed: int = 3, **fields: Any) -> Any:
    base = build(arch)
    torch.manual_seed(seed)
    return pk.apply(base, pk.BEFT(**fields))


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("init_weights", [False, True])
def test_initialisation_and_forward_equal_hf(arch: str, init_weights: bool) -> None:
    fields = {**(BERT if arch == "bert" else LLAMA), "init_weights": init_weights}
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    assert_same_tensors_as_hf(ours, hf)  # the same draws from the global generator, in the same order
    layer = ours.get_submodule(next(n for n, m in ours.named_modules() if isinstance(m, BEFTLayer)))
    assert layer.beft_bias["default"].shape == (1, layer.out_features)
    inputs = batch(arch)
    with torch.no_grad():
        base = build(arch)(**inputs).logits
        expected, result = hf(**inputs), ours(**inputs)
    assert torch.equal(result.logits, expected.logits)
    assert torch.equal(result.logits, base) is init_weights  # b = 0: the unchanged model


def test_the_output_gains_the_bias_vectors_of_the_active_adapters() -> None:
    torch.manual_seed(0)
    base, x = torch.nn.Linear(6, 5), torch.randn(2, 3, 6)
    layer = BEFTLayer(base)
    layer.add("a", init_weights=False)
    layer.add("b", init_weights=False)
    layer.set_active(["a", "b"])
    with torch.no_grad():
        want = base(x) + layer.beft_bias["a"][0] + layer.beft_bias["b"][0]
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def test_gradients_equal_hf() -> None:
    fields = {**LLAMA, "init_weights": False}
    hf, ours = hf_model("llama", **fields), ours_model("llama", **fields)
    assert_gradients_match_hf(hf, ours, batch("llama"), "beft_")


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base b is drawn, rounded to bf16 and kept in fp32; the sum is rounded to the output's dtype."""
    fields = {**LLAMA, "init_weights": False}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(build("llama").to(torch.bfloat16), peft.BeftConfig(**fields)).eval()
    torch.manual_seed(3)
    mine = pk.apply(build("llama").to(torch.bfloat16), pk.BEFT(**fields))
    assert_same_tensors_as_hf(mine, theirs)
    assert all(t.dtype == torch.float32 for t in trainable_tensors(mine).values())
    with torch.no_grad():
        assert torch.equal(run(mine, "llama"), run(theirs, "llama"))


@pytest.mark.parametrize(("arch", "fields"), [("bert", BERT), ("llama", LLAMA)])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    inputs = batch(arch)
    with torch.no_grad():  # a trained classifier head (bert's modules_to_save) must travel with the file too
        randomize_trainable(hf, 0.3, seed=1)
        copy_from_hf(ours, hf)
        want = hf(**inputs).logits
    hf_config, our_config = assert_files_cross_load(hf, ours, arch, inputs, want, tmp_path, atol=0)
    keys = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    assert any(k.endswith(".beft_bias") for k in keys)
    for config in (hf_config, our_config):
        config.pop("target_modules")  # HF PEFT writes a set as given, peftkit leaf names or an exact-name regex
        config["modules_to_save"] = [m for m in config["modules_to_save"] or [] if m != "score"] or None
    assert our_config == hf_config
    assert "exclude_modules" not in our_config and our_config["peft_type"] == "BEFT"


def test_merge_unmerge_and_unload_add_to_the_biases_as_hf() -> None:
    fields = {**BERT, "init_weights": False}
    hf, ours = hf_model("bert", **fields), ours_model("bert", **fields)
    assert_merges_as_hf(hf, ours, batch("bert"), BEFTLayer, arch="bert", atol=1e-6)


def test_merging_into_a_layer_without_a_bias_is_refused_before_anything_changes() -> None:
    model = ours_model("llama", target_modules=["v_proj"], init_weights=False)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match=r"BEFT adapters \['default'\] at model\.layers\.0\.self_attn\.v_proj "
                                         r"cannot be merged: the layer has no bias.*merge=False"):
        pk.merge(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        pk.unload(model, merge=True)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    hf = hf_model("llama", target_modules=["v_proj"], init_weights=False)
    with pytest.raises(ValueError, match="no bias"):  # HF PEFT refuses it too
        hf.merge_and_unload()


OPT: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "init_weights": False}


def two_opt_adapters(other: dict[str, Any]) -> tuple[Any, Any]:
    """HF PEFT's and peftkit's tiny OPT (whose projections have biases) with adapters ``default`` (OPT) and
    ``other``, from the same seeds."""
    hf, ours = hf_model("opt", **OPT), ours_model("opt", **OPT)
    torch.manual_seed(4)
    hf.add_adapter("other", peft.BeftConfig(task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.BEFT(**other), name="other")
    return hf, ours


def test_several_adapters_disable_merge_and_delete_as_in_hf() -> None:
    """Both adapters merge into the biases, summed as HF PEFT sums them."""
    hf, ours = two_opt_adapters({"target_modules": ["v_proj", "fc2"], "init_weights": False})
    theirs = {n.removeprefix("base_model.model."): p for n, p in hf.named_parameters() if "beft_bias" in n}
    assert len(theirs) == 8 and all(torch.equal(ours.get_parameter(n), p) for n, p in theirs.items())
    check_two_adapters_as_hf(hf, ours, "opt")
    pk.delete_adapter(ours, "other")
    layer = ours.model.decoder.layers[0]
    assert not isinstance(layer.fc2, BEFTLayer) and "other" not in layer.self_attn.v_proj.beft_bias
    assert pk.list_adapters(ours) == ["default"]


def test_quantized_linears_get_the_bias_and_merge_it() -> None:
    """As HF PEFT does on bitsandbytes' linears (subclasses of nn.Linear): the output gains b; merging adds it to
    the quantized layer's float bias, leaving the quantized weight as it was."""
    quantized = pk.quantize(build("bert"), compute_dtype=torch.float32)
    plain = pk.unload(copy.deepcopy(quantized), merge=False, dequantize=True)
    for model in (quantized, plain):
        torch.manual_seed(5)
        pk.apply(model, pk.BEFT(**BERT, init_weights=False))
    with torch.no_grad():
        expected = run(plain, "bert")
        torch.testing.assert_close(run(quantized, "bert"), expected, rtol=1e-5, atol=1e-5)
        pk.merge(quantized)
        torch.testing.assert_close(run(quantized, "bert"), expected, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_and_bad_fields_are_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="Conv1D"):
        pk.apply(build("gpt2"), pk.BEFT(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):  # HF PEFT refuses Conv1D too
        peft.get_peft_model(build("gpt2"), peft.BeftConfig(target_modules=["c_attn"]))
    with pytest.raises(UnsupportedLayerError):
        BEFTLayer(torch.nn.Embedding(4, 3))
    with pytest.raises(ConfigError, match=r"init_weights='yes' must be True or False"):
        pk.BEFT(init_weights="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="has no default target_modules"):
        pk.apply(build("gpt2"), pk.BEFT())


def test_default_targets_are_hf_peft_s_value_projections() -> None:
    for arch in ("bert", "llama", "t5"):
        ours = pk.apply(build(arch), pk.BEFT())
        hf = peft.get_peft_model(build(arch), peft.BeftConfig())
        theirs = {n.removeprefix("base_model.model.") for n, p in hf.named_parameters() if "beft_bias" in n}
        assert {n for n, _ in ours.named_parameters() if "beft_bias" in n} == theirs and theirs


def test_a_file_with_an_option_peftkit_lacks_is_refused(tmp_path: Path) -> None:
    hf = hf_model("llama", **LLAMA)
    hf.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "bias_scale": 2.0}))
    with pytest.raises(ConfigError, match="bias_scale=2.0.*BEFT"):
        pk.load_adapter(build("llama"), tmp_path)


def test_peft_method_name() -> None:
    assert PEFT_METHODS["beft"] == "BEFT"


def test_merging_one_adapter_keeps_the_other_active_one_unlike_hf() -> None:
    """HF PEFT's merged layer skips its unmerged active adapters; peftkit still adds them (see the README)."""
    hf, ours = two_opt_adapters(OPT)
    hf.base_model.set_adapter(["default", "other"])
    pk.set_adapter(ours, ["default", "other"])
    with torch.no_grad():
        want = run(ours, "opt")
        pk.merge(ours, ["default"])
        torch.testing.assert_close(run(ours, "opt"), want, rtol=0, atol=1e-5)
        hf.base_model.merge_adapter(["default"])
        assert not torch.allclose(run(hf, "opt"), want, atol=1e-3)
