"""Base embedding weights HF PEFT saves beside an adapter that targets ``embed_tokens`` or ``lm_head``.

HF PEFT's ``save_embedding_layers="auto"`` stores the wrapped layer's base weight too (``…base_layer.weight``), and
loading puts it back into the model: a vocabulary whose rows were changed before the adapter travels with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk

from models import build

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("layer", ["lm_head", "embed_tokens"])
def test_saved_base_embedding_weights_load_as_in_hf_peft(layer: str, tmp_path: Path) -> None:
    model = build("llama")
    with torch.no_grad():  # rows changed before training (e.g. new tokens initialised): only the file has them
        getattr(model, "lm_head" if layer == "lm_head" else "model").get_parameter(
            "weight" if layer == "lm_head" else "embed_tokens.weight")[90:].normal_()
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", layer],
                                                        init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    path = "lm_head" if layer == "lm_head" else "model.embed_tokens"
    assert f"base_model.model.{path}.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    again = peft.PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    ours = pk.load_adapter(build("llama"), tmp_path)
    with torch.no_grad():
        expected = theirs(IDS).logits
        torch.testing.assert_close(again(IDS).logits, expected)
        torch.testing.assert_close(ours(IDS).logits, expected)
