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

from models import build, randomize_trainable

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


@pytest.mark.parametrize("dora", [False, True])
def test_a_scaled_embedding_scales_the_update_as_in_hf_peft(dora: bool, tmp_path: Path) -> None:
    """Gemma multiplies its embedding lookups by √dim (``embed_scale``), and HF PEFT the LoRA or DoRA update with
    them: adapters on its ``embed_tokens`` give the same logits in both libraries, both ways."""
    assert float(build("gemma").get_input_embeddings().embed_scale) != 1.0
    theirs = peft.get_peft_model(build("gemma"), peft.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                                 use_dora=dora))
    randomize_trainable(theirs, scale=0.2, seed=5)
    theirs.eval().save_pretrained(tmp_path / "hf")
    ours = pk.apply(build("gemma"), (pk.DoRA if dora else pk.LoRA)(target_modules=["embed_tokens"], rank=2))
    randomize_trainable(ours, scale=0.2, seed=6)
    pk.save_adapter(ours, tmp_path / "pk")
    with torch.no_grad():
        loaded = pk.load_adapter(build("gemma"), tmp_path / "hf")
        torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
        again = peft.PeftModel.from_pretrained(build("gemma"), tmp_path / "pk").eval()
        torch.testing.assert_close(again(IDS).logits, ours.eval()(IDS).logits, rtol=1e-5, atol=1e-5)
