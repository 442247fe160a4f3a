"""``modules_to_save`` between HF PEFT and peftkit: HF PEFT selects every module whose qualified name ends with an
entry as a plain string (``"norm"`` also selects Llama's ``input_layernorm``), peftkit a module named so or ending
in ``.norm``. Each library's file loads in the other with the modules its writer trained."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit as pk
from peftkit.core.state import get_state

from models import build, randomize_trainable, run

peft = pytest.importorskip("peft")

NORMS = ["model.norm"] + [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm",
                                                                             "post_attention_layernorm")]


def test_hf_peft_suffix_entry_selects_every_module_ending_with_it(tmp_path) -> None:
    hf = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                             modules_to_save=["norm"]))
    randomize_trainable(hf, scale=0.2, seed=1)
    hf.eval().save_pretrained(str(tmp_path))
    ours = pk.load_adapter(build("llama"), tmp_path)
    assert sorted(get_state(ours).saved["default"]) == sorted(NORMS)
    with torch.no_grad():
        torch.testing.assert_close(run(ours, "llama"), run(hf, "llama"), rtol=1e-5, atol=1e-5)


def test_peftkit_entry_is_written_as_the_modules_it_selected(tmp_path) -> None:
    ours = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"], rank=2, modules_to_save=["norm"]))
    randomize_trainable(ours, scale=0.2, seed=2)
    pk.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    hf = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(hf, "llama"), run(ours.eval(), "llama"), rtol=1e-5, atol=1e-5)


def test_leaf_names_are_kept_where_hf_peft_reads_them_alike(tmp_path) -> None:
    ours = pk.apply(build("bert"), pk.LoRA(target_modules=["query"], rank=2, modules_to_save=["classifier"]))
    pk.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
