"""Bad adapter directories: every error names the problem, and the model is left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit as pk
from peftkit.errors import CheckpointError, ConfigError, ShapeMismatchError

from models import build, randomize_adapters


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4))
    randomize_adapters(model)
    pk.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor], list[bool]]:
    return ([n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()])


def assert_untouched(model: torch.nn.Module, before) -> None:
    names, state, grads = before
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert pk.list_adapters(model) == []


def test_layout_and_keys_match_hf_peft(saved: Path) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["task_type"] == "CAUSAL_LM"
    keys = set(load_file(saved / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2


def load_into_fresh(directory: Path, error: type[Exception], match: str) -> None:
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pk.load_adapter(model, directory)
    assert_untouched(model, before)


def test_missing_config(tmp_path: Path) -> None:
    load_into_fresh(tmp_path, CheckpointError, "no adapter_config.json")


def test_invalid_json(saved: Path) -> None:
    (saved / "adapter_config.json").write_text("{not json")
    load_into_fresh(saved, CheckpointError, "not valid JSON")


def test_unknown_peft_type(saved: Path) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    config["peft_type"] = "MAGIC"
    (saved / "adapter_config.json").write_text(json.dumps(config))
    load_into_fresh(saved, ConfigError, "unknown peft_type 'MAGIC'")


def test_invalid_rank_in_file(saved: Path) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = 0
    (saved / "adapter_config.json").write_text(json.dumps(config))
    load_into_fresh(saved, ConfigError, "rank=0")


def test_truncated_weights(saved: Path) -> None:
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    load_into_fresh(saved, CheckpointError, "truncated or corrupt")


def test_garbage_weights(saved: Path) -> None:
    (saved / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    load_into_fresh(saved, CheckpointError, "truncated or corrupt")


def test_missing_and_unexpected_keys(saved: Path) -> None:
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_C.weight"] = tensors.pop(key)
    save_file(tensors, path)
    load_into_fresh(saved, CheckpointError, r"missing keys \[.*v_proj\.lora_B\.weight.*unexpected keys \[.*lora_C")


def test_shape_mismatch_names_key_and_both_shapes(saved: Path) -> None:
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, path)
    load_into_fresh(saved, ShapeMismatchError, r"q_proj\.lora_A\.weight.*\(4, 31\).*\(4, 32\)")


def test_legacy_bin_needs_explicit_opt_in(saved: Path) -> None:
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    load_into_fresh(saved, CheckpointError, "legacy_bin=True")
    model = build("llama")
    pk.load_adapter(model, saved, legacy_bin=True)
    assert pk.list_adapters(model) == ["default"]


def test_interrupted_save_keeps_previous_adapter(saved: Path, monkeypatch) -> None:
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj", "v_proj"], rank=4))

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("peftkit.io.hf_format.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pk.save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_several_adapters_use_hf_subfolders(tmp_path: Path) -> None:
    model = build("llama")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"]))
    pk.apply(model, pk.LoRA(target_modules=["v_proj"], rank=2), name="task2")
    randomize_adapters(model)
    pk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "task2" / "adapter_config.json").is_file()
    fresh = build("llama")
    pk.load_adapter(fresh, tmp_path)
    pk.load_adapter(fresh, tmp_path / "task2", name="task2")
    ids = torch.randint(0, 96, (1, 6))
    for name in ("default", "task2"):
        pk.set_adapter(model, name)
        pk.set_adapter(fresh, name)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_loaded_adapter_is_frozen_unless_trainable(saved: Path) -> None:
    model = build("llama")
    pk.load_adapter(model, saved)
    assert not any(p.requires_grad for p in model.parameters())
    model = build("llama")
    pk.load_adapter(model, saved, trainable=True)
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field,value", [
    ("use_qalora", True),
    ("use_bdlora", {"target_modules_bd_a": ["v_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}),
    ("kasa_config", {"beta": 1e-4, "gamma": 1e-3}),
    ("monteclora_config", {"num_samples": 8}),
    ("velora_config", {"num_groups": 4, "scale": 1.0, "init_type": "batch_average"}),
    ("arrow_config", {"top_k": 2}),
])
def test_hf_lora_options_peftkit_lacks_are_refused_by_name(saved: Path, field: str, value: object) -> None:
    """An HF PEFT option that changes what the adapter computes is refused, not half-loaded."""
    data = json.loads((saved / "adapter_config.json").read_text())
    data[field] = value
    (saved / "adapter_config.json").write_text(json.dumps(data))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=rf"{field}=.*peftkit does not support"):
        pk.load_adapter(model, saved)
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_a_directory_holding_only_named_adapters_names_their_subdirectories(saved: Path, tmp_path: Path) -> None:
    """HF PEFT's save_pretrained puts every adapter not called ``default`` in a subdirectory of its name."""
    parent = tmp_path / "several"
    for name in ("first", "second"):
        (parent / name).mkdir(parents=True)
        for file in saved.iterdir():
            (parent / name / file.name).write_bytes(file.read_bytes())
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"subdirectories 'first', 'second'.*several/first', name='first'"):
        pk.load_adapter(model, parent)
    assert_untouched(model, before)
