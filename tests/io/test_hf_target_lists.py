"""HF PEFT target lists written for several architectures: on loading, entries naming no module of this model are
skipped as HF PEFT skips them (it needs only one entry to match), and a list matching nothing is still an error."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import TargetNotFoundError

from models import build, run

peft = pytest.importorskip("peft")

#: Each config lists Llama's modules beside GPT-2's and GPT-NeoX's, as training scripts shared across models do.
CONFIGS: dict[str, Any] = {
    "lora": lambda: peft.LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM",
                                    target_modules=["q_proj", "v_proj", "query_key_value", "c_attn"],
                                    exclude_modules=["W_pack"]),
    "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj", "query_key_value",
                                                                         "dense_4h_to_h"],
                                  feedforward_modules=["down_proj", "dense_4h_to_h"]),
    "adalora": lambda: peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "c_attn"], init_r=4,
                                          target_r=2, total_step=10),
    "trainable_tokens": lambda: peft.TrainableTokensConfig(token_indices=[1, 5],
                                                           target_modules=["embed_tokens", "wte"]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_entries_naming_no_module_are_skipped_as_in_hf_peft(method: str, tmp_path) -> None:
    hf = peft.get_peft_model(build("llama"), CONFIGS[method]())
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(str(tmp_path))
    loaded = pk.load_adapter(build("llama"), tmp_path)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".token_adapter")
               for n, m in hf.named_modules() if hasattr(m, "base_layer")}
    assert set(get_state(loaded).targets["default"]) == adapted
    with torch.no_grad():
        assert torch.allclose(run(loaded, "llama"), run(hf, "llama"), atol=1e-6)


def test_a_list_matching_no_module_is_still_an_error(tmp_path) -> None:
    hf = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    hf.save_pretrained(str(tmp_path))
    config = (tmp_path / "adapter_config.json").read_text().replace('"q_proj"', '"c_attn", "query_key_value"')
    (tmp_path / "adapter_config.json").write_text(config)
    model = build("llama")
    with pytest.raises(TargetNotFoundError, match="'c_attn' matches no module"):
        pk.load_adapter(model, tmp_path)
    assert pk.list_adapters(model) == []
