"""P-tuning: HF PEFT parity (logits, loss, saved table, config JSON, parameter count) both ways, the loaded
fixed table, generate, training through the encoder, and config validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import TASKS, batch, greedy_reference

import peftkit as pk
from peftkit.core.state import get_state
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.prompt import PromptEmbedding
from peftkit.methods.ptuning import PromptEncoder
from peftkit.train.config import PEFT_METHODS

from models import build, randomize_trainable, train_losses

peft = pytest.importorskip("peft")

KINDS = ["MLP", "LSTM"]
M, HIDDEN = 3, 16
# Fields HF PEFT writes that say nothing about the adapter (its version, its auto-class hook).
HF_ONLY = {"peft_version", "auto_mapping"}


def hf_model(arch: str, kind: str) -> torch.nn.Module:
    """An HF PEFT P-tuning model in training mode (encoder present), its trainable tensors random."""
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    config = peft.PromptEncoderConfig(task_type=TASKS[arch], num_virtual_tokens=M, encoder_hidden_size=HIDDEN,
                                      encoder_reparameterization_type=kind, **extra)
    model = peft.get_peft_model(build(arch), config)
    randomize_trainable(model)
    return model.eval()


def ours_config(arch: str, kind: str, **kw: object) -> pk.PTuning:
    return pk.PTuning(num_virtual_tokens=M, encoder_reparameterization_type=kind, encoder_hidden_size=HIDDEN,
                      modules_to_save=["classifier"] if arch == "bert" else (), **kw)  # type: ignore[arg-type]


def encoder_of(model: torch.nn.Module, name: str = "default") -> torch.nn.Module:
    return model.prompt_encoder.prompt_modules[name]


def saved_json(directory) -> dict[str, object]:
    data = json.loads((directory / "adapter_config.json").read_text())
    # HF PEFT lists both head names a classifier may have (BERT has no ``score``), some twice.
    data["modules_to_save"] = sorted(set(data["modules_to_save"] or []) - {"score"})
    return {k: v for k, v in data.items() if k not in HF_ONLY}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(TASKS))
def test_hf_parity_both_ways(arch: str, kind: str, tmp_path) -> None:
    hf = hf_model(arch, kind)
    inputs = batch(arch)
    with torch.no_grad():
        want = hf(**inputs)
    hf.save_pretrained(str(tmp_path / "hf"))

    # HF → peftkit: the file holds the encoder's output, which runs as a fixed table.
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    assert type(encoder_of(loaded)) is PromptEmbedding
    with torch.no_grad():
        got = loaded(**inputs)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)

    # A loaded adapter saves back to the same config, and HF PEFT loads it to the same logits.
    pk.save_adapter(loaded, tmp_path / "back")
    assert saved_json(tmp_path / "back") == saved_json(tmp_path / "hf")
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert torch.allclose(back(**inputs).logits, want.logits, atol=1e-5)

    if arch == "bert":
        return  # (HF's classifier copy is random too; the encoder path is the same for every task)
    # peftkit → HF while training: the same encoder gives the same logits live and the same saved table.
    ours = build(arch)
    pk.apply(ours, ours_config(arch, kind))
    encoder_of(ours).load_state_dict(hf.prompt_encoder["default"].state_dict())
    with torch.no_grad():
        live = ours(**inputs)
    assert torch.allclose(live.logits, want.logits, atol=1e-5)
    assert torch.allclose(live.loss, want.loss, atol=1e-5)
    pk.save_adapter(ours, tmp_path / "pk")
    assert saved_json(tmp_path / "pk") == saved_json(tmp_path / "hf")
    table, hf_table = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pk", "hf"))
    assert table.keys() == hf_table.keys() == {"prompt_embeddings"}
    assert table["prompt_embeddings"].shape == (M * (2 if arch == "t5" else 1), 32)
    assert torch.allclose(table["prompt_embeddings"], hf_table["prompt_embeddings"], atol=1e-5)
    from_ours = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        assert torch.allclose(from_ours(**inputs).logits, want.logits, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(TASKS))
def test_trainable_parameter_count_equals_hf(arch: str, kind: str) -> None:
    hf = hf_model(arch, kind)
    ours = build(arch)
    pk.apply(ours, ours_config(arch, kind))
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    # The default hidden size is the model's, as in HF PEFT.
    hf_default = peft.get_peft_model(build("llama"), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=M, encoder_reparameterization_type=kind))
    default = build("llama")
    pk.apply(default, pk.PTuning(num_virtual_tokens=M, encoder_reparameterization_type=kind))
    assert pk.count_parameters(default) == tuple(hf_default.get_nb_trainable_parameters())


def test_loaded_adapter_is_a_frozen_table_or_a_trainable_one(tmp_path) -> None:
    hf_model("llama", "LSTM").save_pretrained(str(tmp_path))
    frozen = pk.load_adapter(build("llama"), tmp_path)
    assert pk.count_parameters(frozen)[0] == 0
    trainable = pk.load_adapter(build("llama"), tmp_path, trainable=True)
    assert pk.count_parameters(trainable)[0] == M * 32  # the table only: the encoder is not in the file
    config = get_state(trainable).configs["default"]
    assert isinstance(config, pk.PTuning) and config.fixed_table and config.encoder_reparameterization_type == "LSTM"


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_the_encoder_equals_full_forward_decoding(kind: str) -> None:
    model = build("llama")
    pk.apply(model, ours_config("llama", kind))
    model.generation_config.eos_token_id = None
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, greedy_reference(model, inputs, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_training_through_the_encoder_lowers_the_loss(kind: str, tmp_path) -> None:
    model = build("llama")
    model.train()
    dropout = {"encoder_dropout": 0.2} if kind == "LSTM" else {}
    pk.apply(model, ours_config("llama", kind, **dropout))
    module = encoder_of(model)
    assert isinstance(module, PromptEncoder)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    inputs = batch("llama")
    losses = train_losses(model, lambda: model(**inputs).loss, lr=0.01)
    assert losses[-1] < losses[0] - 0.05
    assert all(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # E and g all learn
    # The saved table is the encoder's output without dropout, even in training mode.
    pk.save_adapter(model, tmp_path)
    assert model.training
    module.eval()
    with torch.no_grad():
        expected = module.prompt()
    assert torch.equal(load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"], expected)


def test_disable_merge_error_delete_and_training_config_name() -> None:
    model = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    pk.apply(model, pk.PTuning(num_virtual_tokens=2, encoder_hidden_size=8))
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == 8
        with pk.disable_adapters(model):
            assert torch.equal(model(**inputs).logits, base)
    with pytest.raises(MergeError, match="virtual tokens"):
        pk.merge(model)
    pk.delete_adapter(model, "default")
    assert not hasattr(model, "prompt_encoder")
    assert getattr(pk, str(PEFT_METHODS["p_tuning"])) is pk.PTuning


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type='GRU'"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ({"num_virtual_tokens": -3}, "num_virtual_tokens=-3"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size=0"),
    ({"encoder_num_layers": 0, "encoder_reparameterization_type": "LSTM"}, "encoder_num_layers=0"),
    ({"encoder_dropout": 1.0, "encoder_reparameterization_type": "LSTM"}, "encoder_dropout=1.0"),
    ({"encoder_num_layers": 3}, "encoder_num_layers=3 has no effect on the MLP"),
    ({"encoder_dropout": 0.1}, "encoder_dropout=0.1 has no effect on the MLP"),
])
def test_bad_config_values_raise_naming_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.PTuning(**kwargs)  # type: ignore[arg-type]
    assert pk.PTuning(encoder_reparameterization_type="lstm").encoder_reparameterization_type == "LSTM"
