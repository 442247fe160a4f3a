"""Uni-LoRA against HF PEFT: index maps, initialisation, forward, gradients, files both ways (with and without saved
indices), merging, several adapters and errors, on a tiny Llama (nn.Linear) and GPT-2 (Conv1D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import batch
from test_vblora import shift

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError
from peftkit.methods.unilora import UniLoRALayer, balanced_indices
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_cross_load,
    assert_gradients_match_hf,
    assert_merges_as_hf,
    build,
    check_two_adapters_as_hf,
    trainable_tensors,
)

peft = pytest.importorskip("peft")

FIELDS = {"theta_d_length": 24}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def hf_model(arch: str, seed: int = 3, rank: int = 2, **fields: object) -> Any:
    fields = {"target_modules": TARGETS[arch], **FIELDS, **fields}
    if "dropout" in fields:
        fields["unilora_dropout"] = fields.pop("dropout")
    base = build(arch)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, peft.UniLoraConfig(task_type="CAUSAL_LM", r=rank, **fields)).eval()


def ours_model(arch: str, seed: int = 3, rank: int = 2, **fields: object) -> Any:
    base = build(arch)
    torch.manual_seed(seed)
    return pk.apply(base, pk.UniLoRA(rank=rank, **{"target_modules": TARGETS[arch], **FIELDS, **fields}))  # type: ignore[arg-type]


def buffers(model: Any) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): b for n, b in model.named_buffers() if "unilora_" in n}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("init_weights", [True, False])
def test_maps_initialisation_and_forward_equal_hf(arch: str, init_weights: bool) -> None:
    hf, ours = hf_model(arch, init_weights=init_weights), ours_model(arch, init_weights=init_weights)
    want, got = trainable_tensors(hf), trainable_tensors(ours)
    assert sorted(got) == sorted(want)  # θ under the first layer's name, as in HF PEFT
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    theirs, mine = buffers(hf), buffers(ours)
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():  # the index maps and scales
        assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name
    inputs = batch(arch)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, hf(**inputs).logits)
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())


def test_global_generator_ends_where_hf_peft_s_does() -> None:
    hf_model("llama")
    after_hf = torch.rand(4)
    ours_model("llama")
    assert torch.equal(torch.rand(4), after_hf)


def test_maps_use_every_entry_evenly_and_scale_by_its_uses() -> None:
    indices = balanced_indices(100, 24, seed=5)
    counts = torch.bincount(indices, minlength=24)
    assert counts.sum() == 100 and set(counts.tolist()) == {4, 5}
    assert torch.equal(peft.UniLoraModel.generate_index(100, 24, 5), indices)
    model = ours_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.factors("default")
    theta = layer.unilora_theta_d["default"]
    idx = layer.unilora_indices_A["default"]
    torch.testing.assert_close(a, theta[idx] * layer.unilora_scales_A["default"])
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ a.T @ b.T)


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base θ is drawn, rounded to bf16 and kept in fp32, the scales in bf16, as HF PEFT does."""
    base_hf, base_ours = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base_hf, peft.UniLoraConfig(r=2, target_modules=TARGETS["llama"], **FIELDS)).eval()
    torch.manual_seed(3)
    mine = pk.apply(base_ours, pk.UniLoRA(rank=2, target_modules=TARGETS["llama"], **FIELDS))  # type: ignore[arg-type]
    got = trainable_tensors(mine)
    for name, tensor in trainable_tensors(theirs).items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    mine_buffers = buffers(mine)
    for name, tensor in buffers(theirs).items():
        assert mine_buffers[name].dtype == tensor.dtype and torch.equal(mine_buffers[name], tensor), name
    with torch.no_grad():
        ids = batch("llama")["input_ids"]
        assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    shift(hf, ours)
    assert_gradients_match_hf(hf, ours, batch(arch), "unilora_")


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", {"rank": 3, "proj_seed": 7}),
    ("llama", {"save_indices": True}),
    ("gpt2", {"bias": "all"}),
    ("gpt2", {"bias": "unilora_only", "target_modules": ["c_attn", "mlp.c_proj"], "save_indices": True}),
])
def test_files_load_both_ways_with_equal_logits(arch: str, fields: dict[str, Any], tmp_path: Path) -> None:
    hf, ours = hf_model(arch, **fields), ours_model(arch, **fields)
    inputs = batch(arch)
    shift(hf, ours)  # trained biases too: they must travel with the file
    with torch.no_grad():
        want = hf(**inputs).logits
        assert torch.equal(ours(**inputs).logits, want)
    hf_config, our_config = assert_files_cross_load(hf, ours, arch, inputs, want, tmp_path, atol=1e-5)
    hf_config.pop("target_modules")  # HF PEFT writes a set: the tensor keys show both select the same modules
    our_config.pop("target_modules")
    assert our_config == hf_config
    saved = load_file(str(tmp_path / "pk" / "adapter_model.safetensors"))
    assert ("base_model.unilora_theta_d" in saved) and any("unilora_indices_A" in k for k in saved) == bool(
        fields.get("save_indices"))


def test_saved_indices_are_used_when_loading(tmp_path: Path) -> None:
    ours = ours_model("llama", save_indices=True)
    shift(ours)
    pk.save_adapter(ours, tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace('"proj_seed": 42', '"proj_seed": 1')
    (tmp_path / "adapter_config.json").write_text(config)  # another seed: the saved maps must win
    mine = pk.load_adapter(build("llama"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    inputs = batch("llama")
    with torch.no_grad():
        want = ours(**inputs).logits
        torch.testing.assert_close(mine(**inputs).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(theirs(**inputs).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_unload_equal_hf(arch: str) -> None:
    hf, ours = hf_model(arch), ours_model(arch)
    shift(hf, ours)
    assert_merges_as_hf(hf, ours, batch(arch), UniLoRALayer, arch)


def test_several_adapters_share_one_theta_module_as_in_hf() -> None:
    hf, ours = hf_model("llama"), ours_model("llama")
    other = {"theta_d_length": 10, "proj_seed": 3, "target_modules": ["v_proj", "o_proj"]}
    torch.manual_seed(4)
    hf.add_adapter("other", peft.UniLoraConfig(r=3, task_type="CAUSAL_LM", **other))
    torch.manual_seed(4)
    pk.apply(ours, pk.UniLoRA(rank=3, **other), name="other")  # type: ignore[arg-type]
    shared = {id(m.unilora_theta_d) for m in ours.modules() if isinstance(m, UniLoRALayer)}
    assert len(shared) == 1
    theirs = buffers(hf)
    for name, tensor in buffers(ours).items():
        assert torch.equal(tensor, theirs[name]), name
    layer = ours.model.layers[0].self_attn.q_proj
    assert sorted(layer.unilora_theta_d) == ["default", "other"]
    check_two_adapters_as_hf(hf, ours)
    pk.set_adapter(ours, "other")
    assert layer.unilora_theta_d["other"].requires_grad and not layer.unilora_theta_d["default"].requires_grad
    pk.delete_adapter(ours, "other")
    assert not isinstance(ours.model.layers[0].self_attn.o_proj, UniLoRALayer)
    assert sorted(layer.unilora_theta_d) == ["default"]


def test_default_targets_are_lora_s_as_in_hf() -> None:
    model = build("llama")
    pk.apply(model, pk.UniLoRA(**FIELDS))  # type: ignore[arg-type]
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, UniLoRALayer)}) == [
        "q_proj", "v_proj"]


def test_errors() -> None:
    with pytest.raises(ConfigError, match="rank=0 must be an integer >= 1"):
        pk.UniLoRA(rank=0)
    with pytest.raises(ConfigError, match="theta_d_length=0 must be an integer >= 1"):
        pk.UniLoRA(theta_d_length=0)
    with pytest.raises(ConfigError, match="init_theta_d_bound=0 must be a finite number > 0"):
        pk.UniLoRA(init_theta_d_bound=0)
    with pytest.raises(ConfigError, match=r"dropout=1.0 must be in \[0, 1\)"):
        pk.UniLoRA(dropout=1.0)
    with pytest.raises(ConfigError, match="bias='lora_only' must be one of"):
        pk.UniLoRA(bias="lora_only")
    with pytest.raises(ConfigError, match="save_indices=1 must be True or False"):
        pk.UniLoRA(save_indices=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="proj_seed=-1 must be a non-negative integer"):
        pk.UniLoRA(proj_seed=-1)
    model = build("llama")
    with pytest.raises((UnsupportedLayerError, TargetNotFoundError), match="embed_tokens"):
        pk.apply(model, pk.UniLoRA(target_modules=["embed_tokens"], **FIELDS))  # type: ignore[arg-type]
    assert not any(isinstance(m, UniLoRALayer) for m in model.modules())
    with pytest.raises(UnsupportedLayerError, match="UniLoRA cannot adapt a Conv2d"):
        UniLoRALayer(torch.nn.Conv2d(4, 4, 1), torch.nn.ParameterDict())
    broken = ours_model("llama")
    with torch.no_grad():
        broken.model.layers[1].self_attn.v_proj.unilora_theta_d["default"][0] = float("nan")
    with pytest.raises(MergeError, match="NaN or Inf"):
        pk.merge(broken, safe=True)
    assert getattr(pk, str(PEFT_METHODS["unilora"])) is pk.UniLoRA


def test_state_dict_holds_the_maps_of_each_adapter_that_saves_them_as_in_hf() -> None:
    other = {"theta_d_length": 10, "target_modules": ["q_proj"]}
    hf, ours = hf_model("llama", save_indices=True), ours_model("llama", save_indices=True)
    hf.add_adapter("other", peft.UniLoraConfig(r=2, save_indices=False, **other))
    pk.apply(ours, pk.UniLoRA(rank=2, save_indices=False, **other), name="other")  # type: ignore[arg-type]
    theirs = {k.removeprefix("base_model.model.") for k in hf.state_dict()  # θ also at HF PEFT's model level
              if "unilora_" in k and not k.startswith("base_model.unilora_theta_d")}
    mine = {k for k in ours.state_dict() if "unilora_" in k}
    assert mine == theirs
    assert "model.layers.0.self_attn.q_proj.unilora_indices_A.default" in mine
    assert "model.layers.0.self_attn.q_proj.unilora_indices_A.other" not in mine
