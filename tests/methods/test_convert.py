"""Exact performant ⇄ canonical conversion, in place and at save time, and HF PEFT reading the exports."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from test_canonical import IDS, tiny

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import AdapterStateError, ConfigError


def _perturb_A(model: torch.nn.Module, seed: int = 0) -> None:
    """Untie the parts' A so the canonical → performant direction has to stack them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox", "phi3"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_is_exact(kind: str, use_rslora: bool) -> None:
    model = tiny(kind)
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv", "linear_fc1", "linear_proj"], rank=4, alpha=8,
                            init_B="gaussian", use_rslora=use_rslora))
    reference = model(IDS).logits
    pk.convert(model, to="canonical")
    torch.testing.assert_close(model(IDS).logits, reference, rtol=1e-6, atol=1e-6)
    _perturb_A(model)
    untied = model(IDS).logits
    assert (untied - reference).abs().max() > 1e-3
    pk.convert(model, to="performant")
    config = get_state(model).configs["default"]
    assert type(config) is pk.LoRA
    torch.testing.assert_close(model(IDS).logits, untied, rtol=1e-6, atol=1e-6)
    # stacked parts: rank k·r with the scale kept (α·k, or α·√k with rsLoRA)
    k = {name: len(g) for g in config.shared_A for name in g}
    for name, rank in config.rank_pattern.items():
        parts = rank // 4
        assert parts in (2, 3)
        expected = 8 * (parts ** 0.5 if use_rslora else parts)
        assert config.alpha_pattern[name] == pytest.approx(expected)
        assert name not in k or k[name] == parts
    pk.convert(model, to="canonical")
    torch.testing.assert_close(model(IDS).logits, untied, rtol=1e-6, atol=1e-6)


def test_tied_parts_convert_back_to_the_same_rank() -> None:
    model = tiny("phi3")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, init_B="gaussian"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    pk.convert(model, to="canonical")
    pk.convert(model, to="performant")
    after = {k: v for k, v in model.state_dict().items() if "lora" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_layout_canonical_and_back(tmp_path) -> None:
    model = tiny("gpt2")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv", "linear_fc2"], rank=2, init_B="gaussian"))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path, layout="canonical")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "CANONICAL_LORA"
    loaded = pk.load_adapter(tiny("gpt2"), tmp_path)
    assert isinstance(get_state(loaded).configs["default"], pk.CanonicalLoRA)
    torch.testing.assert_close(loaded(IDS).logits, reference, rtol=1e-6, atol=1e-6)
    assert type(get_state(model).configs["default"]) is pk.LoRA  # saving did not change the model


def test_performant_llama_exports_as_hf_adapter_on_q_k_v(tmp_path) -> None:
    from peft import PeftModel

    model = tiny("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv", "linear_fc1"], rank=4, alpha=8, init_B="gaussian"))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    # peftkit's own settings (the shared A's groups) are in their own file: HF PEFT warns about unknown keys.
    assert "peftkit" not in config
    assert "shared_A" in json.loads((tmp_path / "peftkit_config.json").read_text())["settings"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hf = PeftModel.from_pretrained(tiny("llama"), tmp_path).eval()
    torch.testing.assert_close(hf(IDS).logits, reference, rtol=1e-5, atol=1e-5)
    # and back into peftkit, A shared again
    loaded = pk.load_adapter(tiny("llama"), tmp_path)
    attn = loaded.model.layers[1].self_attn
    assert attn.q_proj.lora_A["default"] is attn.v_proj.lora_A["default"]
    torch.testing.assert_close(loaded(IDS).logits, reference, rtol=0, atol=1e-6)
    # A plain adapter saved over it leaves no stale settings behind.
    plain = tiny("llama")
    pk.apply(plain, pk.LoRA(target_modules=["q_proj"], rank=2))
    pk.save_adapter(plain, tmp_path)
    assert not (tmp_path / "peftkit_config.json").exists()


def test_settings_inside_adapter_config_json_still_load(tmp_path) -> None:
    model = tiny("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, alpha=8, init_B="gaussian"))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peftkit"] = json.loads((tmp_path / "peftkit_config.json").read_text())["settings"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))  # the layout of earlier peftkit versions
    (tmp_path / "peftkit_config.json").unlink()
    loaded = pk.load_adapter(tiny("llama"), tmp_path)
    attn = loaded.model.layers[1].self_attn
    assert attn.q_proj.lora_A["default"] is attn.k_proj.lora_A["default"]
    torch.testing.assert_close(loaded(IDS).logits, reference, rtol=0, atol=1e-6)


def test_canonical_llama_with_untied_parts_exports_performant_for_hf(tmp_path) -> None:
    from peft import PeftModel

    model = tiny("llama")
    pk.apply(model, pk.CanonicalLoRA(target_modules=["linear_q", "linear_k", "linear_v"], rank=2,
                                     init_B="gaussian", use_rslora=True))
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path, layout="performant")
    hf = PeftModel.from_pretrained(tiny("llama"), tmp_path).eval()
    torch.testing.assert_close(hf(IDS).logits, reference, rtol=1e-5, atol=1e-5)


def test_convert_rejects_unknown_layout_and_other_methods() -> None:
    model = tiny("llama")
    pk.apply(model, pk.DoRA(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="layout"):
        pk.convert(model, to="fused")
    with pytest.raises(ConfigError, match="only LoRA and CanonicalLoRA"):
        pk.convert(copy.deepcopy(model), to="canonical")


def test_trainable_token_rows_travel_with_a_conversion(tmp_path) -> None:
    from models import randomize_trainable

    model = tiny("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, trainable_token_indices=[3, 5]))
    randomize_trainable(model)
    reference = model(IDS).logits
    pk.save_adapter(model, tmp_path, layout="canonical")
    torch.testing.assert_close(pk.load_adapter(tiny("llama"), tmp_path)(IDS).logits, reference, rtol=0, atol=1e-6)
    for layout in ("canonical", "performant"):
        pk.convert(model, to=layout)
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-6)
    assert get_state(model).configs["default"].trainable_token_indices == [3, 5]


def test_settings_file_left_by_an_hf_peft_save_over_it_is_ignored(tmp_path, caplog) -> None:
    from peft import PeftModel

    model = tiny("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, alpha=8, init_B="gaussian"))
    pk.save_adapter(model, tmp_path)
    hf = PeftModel.from_pretrained(tiny("llama"), tmp_path, is_trainable=True)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "lora_A" in name:  # HF PEFT trains the q, k and v A's apart
                param.add_(0.1 * torch.randn_like(param))
    hf.eval().save_pretrained(tmp_path)  # over peftkit's files; HF PEFT leaves peftkit_config.json there
    assert (tmp_path / "peftkit_config.json").exists()
    with caplog.at_level("WARNING", logger="peftkit"):
        loaded = pk.load_adapter(tiny("llama"), tmp_path)
    assert "ignoring" in caplog.text and "peftkit_config.json" in caplog.text
    attn = loaded.model.layers[1].self_attn
    assert attn.q_proj.lora_A["default"] is not attn.k_proj.lora_A["default"]
    torch.testing.assert_close(loaded(IDS).logits, hf(IDS).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("content", "error", "match"), [
    ("[1, 2]", "CheckpointError", "holds a JSON list, not an object"),
    ('{"settings": "post"}', "CheckpointError", "not peftkit's settings file"),
    (None, "ConfigError", r"keys among .*shared_A"),  # a settings object with a key LoRA does not keep there
])
def test_a_corrupt_settings_file_is_a_clear_error(tmp_path, content, error, match) -> None:
    import hashlib

    from peftkit import errors

    model = tiny("llama")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4))
    pk.save_adapter(model, tmp_path)
    side = tmp_path / "peftkit_config.json"
    if content is None:
        digest = hashlib.sha256((tmp_path / "adapter_config.json").read_bytes()).hexdigest()
        content = json.dumps({"adapter_config_sha256": digest, "settings": {"rank": 4}})
    side.write_text(content)
    with pytest.raises(getattr(errors, error), match=match):
        pk.load_adapter(tiny("llama"), tmp_path)


def test_convert_with_another_adapter_merged_refuses_before_removing_any() -> None:
    model = tiny("gpt2")
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, init_B="gaussian"), name="a")
    pk.apply(model, pk.LoRA(target_modules=["linear_fc1"], rank=4, init_B="gaussian"), name="b")
    pk.set_adapter(model, ["a", "b"])
    pk.merge(model, names=["b"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match=r"mlp\.c_fc \(b\).*pk\.unmerge"):
        pk.convert(model, to="canonical")
    assert sorted(get_state(model).configs) == ["a", "b"]
    assert type(get_state(model).configs["a"]) is pk.LoRA
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["gpt2", "phi3"])
def test_modules_to_save_copies_travel_with_a_conversion(kind: str, tmp_path) -> None:
    model = tiny(kind)
    base = copy.deepcopy(model)
    pk.apply(model, pk.LoRA(target_modules=["linear_qkv"], rank=4, init_B="gaussian", modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.copies["default"].weight.mul_(1.5)  # a trained head, unlike the base one
    reference = model(IDS).logits
    for layout in ("canonical", "performant"):
        pk.save_adapter(model, tmp_path / layout, layout=layout)
        loaded = pk.load_adapter(copy.deepcopy(base), tmp_path / layout)
        torch.testing.assert_close(loaded(IDS).logits, reference, rtol=1e-5, atol=1e-5)
    pk.convert(model, to="canonical")
    torch.testing.assert_close(model(IDS).logits, reference, rtol=1e-5, atol=1e-5)
    assert model.lm_head.copies["default"].weight.requires_grad
    pk.convert(model, to="performant")
    torch.testing.assert_close(model(IDS).logits, reference, rtol=1e-5, atol=1e-5)
