"""CPT: HF PEFT parity (initial table, logits, weighted loss, gradients, projection, files and config JSON both
ways, parameter count), several adapters, disabling, merge refusal, training, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.cpt import CPTEmbedding
from peftkit.train.config import PEFT_METHODS

from models import build, train_losses

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2"]
# Two context examples: (template, input, output template, output) types 1-4 and 5-8.
FIELDS = {"cpt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12], "cpt_tokens_type_mask": [1, 2, 3, 4, 5, 6, 7, 8],
          "opt_projection_epsilon": 0.5, "opt_projection_format_epsilon": 0.3}
HF_ONLY = {"peft_version", "auto_mapping"}


def inputs(types: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (2, 6), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if types:
        out["input_type_mask"] = torch.tensor([[1, 2, 2, 3, 4, 4], [1, 2, 3, 4, 4, 0]])
    return out


def pair(arch: str, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our CPT model and HF PEFT's, from the same base model and fields, Δ random and equal in both."""
    fields = {**FIELDS, **kw}
    hf = peft.get_peft_model(build(arch), peft.CPTConfig(task_type="CAUSAL_LM", **fields)).eval()
    ours = build(arch).eval()
    pk.apply(ours, pk.CPT(**fields))  # type: ignore[arg-type]
    delta = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * 0.4
    with torch.no_grad():
        hf.prompt_encoder["default"].delta_embedding.weight.copy_(delta)
        module_of(ours).delta_embedding.weight.copy_(delta)
    return ours, hf


def module_of(model: torch.nn.Module, name: str = "default") -> CPTEmbedding:
    module = model.prompt_encoder.prompt_modules[name]
    assert isinstance(module, CPTEmbedding)
    return module


def call(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> object:
    return model(**{k: v.clone() for k, v in batch.items()})  # HF PEFT shifts input_type_mask in place


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kw", [{}, {"opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.7}])
def test_logits_loss_gradients_and_projection_equal_hf(arch: str, kw: dict[str, object]) -> None:
    ours, hf = pair(arch, **kw)
    hf_module, module = hf.prompt_encoder["default"], module_of(ours)
    assert torch.equal(module.embedding.weight, hf_module.embedding.weight)  # E₀: the context's embeddings
    for batch in (inputs(), inputs(types=False)):
        got, want = call(ours, batch), call(hf, batch)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
        assert torch.isfinite(got.loss)
    hf.zero_grad()
    ours.zero_grad()
    call(hf, inputs()).loss.backward()
    call(ours, inputs()).loss.backward()
    grad = module.delta_embedding.weight.grad
    torch.testing.assert_close(grad, hf_module.delta_embedding.weight.grad, rtol=0, atol=1e-6)
    assert not grad[[3, 7]].any() and grad[[0, 1, 2]].abs().sum() > 0  # outputs are not trained
    # The projected Δ (each forward projects it in place) is HF's; rows lie in their balls.
    torch.testing.assert_close(module.delta_embedding.weight, hf_module.delta_embedding.weight, rtol=0, atol=1e-7)
    norms = module.delta_embedding.weight.norm(dim=1)
    assert torch.all(norms <= module.eps * (1 + 1e-5))
    assert ours(input_ids=inputs()["input_ids"]).loss is None


def test_files_both_ways_and_the_same_json(tmp_path) -> None:
    ours, hf = pair("llama")
    batch = {k: v for k, v in inputs().items() if k not in ("labels", "input_type_mask")}
    with torch.no_grad():
        want = hf(**batch).logits
        assert torch.allclose(ours(**batch).logits, want, atol=1e-5)
    hf.save_pretrained(str(tmp_path / "hf"))
    pk.save_adapter(ours, tmp_path / "pk")
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pk", "hf"))
    assert a.keys() == b.keys() == {"prompt_embeddings"}
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], rtol=0, atol=1e-7)
    jsons = [{k: v for k, v in json.loads((tmp_path / d / "adapter_config.json").read_text()).items()
              if k not in HF_ONLY} for d in ("pk", "hf")]
    assert jsons[0] == jsons[1]
    with torch.no_grad():
        back = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "pk")).eval()
        assert torch.allclose(back(**batch).logits, want, atol=1e-5)
        loaded = pk.load_adapter(build("llama").eval(), tmp_path / "hf")
        assert torch.allclose(loaded(**batch).logits, want, atol=1e-5)
        assert not module_of(loaded).delta_embedding.weight.any()
    fresh = build("llama")
    pk.apply(fresh, pk.CPT(**FIELDS))  # type: ignore[arg-type]
    pk.save_adapter(fresh, tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / "adapter_config.json").read_text())["token_dim"] == 32


def test_counts_two_adapters_disable_delete_and_no_merge() -> None:
    model = build("llama").eval()
    base = model(input_ids=inputs()["input_ids"]).logits
    pk.apply(model, pk.CPT(**FIELDS))  # type: ignore[arg-type]
    hf = peft.get_peft_model(build("llama"), peft.CPTConfig(task_type="CAUSAL_LM", **FIELDS))
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())
    pk.apply(model, pk.CPT(cpt_token_ids=[20, 21, 22, 23], cpt_tokens_type_mask=[1, 2, 3, 4]), name="other")
    assert not module_of(model).embedding.weight.requires_grad
    ids = inputs()["input_ids"]
    pk.set_adapter(model, "default")
    first = model(input_ids=ids).logits
    pk.set_adapter(model, "other")
    assert module_of(model, "other").delta_embedding.weight.requires_grad
    assert not module_of(model).delta_embedding.weight.requires_grad
    assert model(input_ids=ids).logits.shape[1] == 4 + 6 and first.shape[1] == 8 + 6
    with pk.disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, base)
        assert model(**{k: v for k, v in inputs().items() if k != "input_type_mask"}).loss is not None
    with pytest.raises(MergeError, match="virtual tokens"):
        pk.merge(model)
    pk.delete_adapter(model, "other")
    pk.delete_adapter(model, "default")
    assert not hasattr(model, "prompt_encoder") and "_peftkit_cpt_loss_hook" not in model.__dict__
    assert torch.equal(model(input_ids=ids).logits, base)


def test_training_lowers_the_loss_within_the_balls() -> None:
    model = build("llama")
    model.train()
    pk.apply(model, pk.CPT(**FIELDS))  # type: ignore[arg-type]
    module = module_of(model)
    table = module.embedding.weight.clone()
    losses = train_losses(model, lambda: call(model, inputs()).loss, lr=0.05)
    assert losses[-1] < losses[0]
    assert torch.equal(module.embedding.weight, table)
    module.project_()
    assert torch.all(module.delta_embedding.weight.norm(dim=1) <= module.eps * (1 + 1e-5))


def test_the_caller_s_type_mask_is_left_unchanged() -> None:
    model = build("llama")
    pk.apply(model, pk.CPT(**FIELDS))  # type: ignore[arg-type]
    batch = inputs()
    types = batch["input_type_mask"].clone()
    model(**batch)
    assert torch.equal(batch["input_type_mask"], types)
    hf = peft.get_peft_model(build("llama"), peft.CPTConfig(task_type="CAUSAL_LM", **FIELDS))
    hf(**batch)  # HF PEFT 0.21.2 adds the context's largest type to the caller's tensor
    assert torch.equal(batch["input_type_mask"], torch.where(types > 0, types + 8, types))


@pytest.mark.parametrize(("fields", "match"), [
    ({"cpt_token_ids": []}, "cpt_token_ids=.*non-empty list"),
    ({"cpt_token_ids": [1, -2]}, r"cpt_token_ids has \[-2\]"),
    ({"cpt_token_ids": [1, 2], "cpt_mask": [1]}, "cpt_mask has 1 values but cpt_token_ids has 2"),
    ({"cpt_token_ids": [1, 2], "cpt_tokens_type_mask": [1, 2, 3]}, "cpt_tokens_type_mask has 3 values"),
    ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type='linear' must be 'none' or 'decay'"),
    ({"opt_loss_decay_factor": 0}, "opt_loss_decay_factor=0 must be a positive number"),
    ({"opt_projection_epsilon": -1.0}, "opt_projection_epsilon=-1.0 must be a positive number"),
    ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'.*causal language models only"),
])
def test_invalid_fields_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.CPT(**fields)  # type: ignore[arg-type]


def test_defaults_are_hf_s_and_other_models_are_refused_before_any_change() -> None:
    assert getattr(pk, str(PEFT_METHODS["cpt"])) is pk.CPT
    config = pk.CPT()
    assert (config.cpt_token_ids, config.cpt_mask, config.cpt_tokens_type_mask) == ([0], [1], [1])
    for arch in ("bert", "t5"):  # HF PEFT's CPT takes task_type CAUSAL_LM only
        model = build(arch)
        with pytest.raises(ConfigError, match="causal language models only"):
            pk.apply(model, pk.CPT())
        assert not hasattr(model, "prompt_encoder")
    model = build("llama")
    with pytest.raises(ConfigError, match=r"cpt_token_ids has ids \[500\] outside the model's 96"):
        pk.apply(model, pk.CPT(cpt_token_ids=[1, 500]))
    assert not hasattr(model, "prompt_encoder")


def test_the_loss_reads_the_active_adapter_s_fields() -> None:
    """HF PEFT 0.21.2 reads the adapter named 'default''s loss fields, and fails when there is none."""
    decay = {**FIELDS, "opt_weighted_loss_type": "decay", "opt_loss_decay_factor": 0.5}
    hf = peft.get_peft_model(build("llama"), peft.CPTConfig(task_type="CAUSAL_LM", **decay), adapter_name="ctx")
    with pytest.raises(KeyError, match="default"):
        call(hf, inputs())
    _, reference = pair("llama", opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5)
    model = build("llama")
    pk.apply(model, pk.CPT(**FIELDS), name="default")  # type: ignore[arg-type]
    pk.apply(model, pk.CPT(**decay), name="ctx")  # type: ignore[arg-type]
    with torch.no_grad():
        module_of(model, "ctx").delta_embedding.weight.copy_(reference.prompt_encoder["default"].delta_embedding.weight)
    pk.set_adapter(model, "ctx")
    torch.testing.assert_close(call(model, inputs()).loss, call(reference, inputs()).loss, rtol=0, atol=1e-6)


def test_generate_equals_greedy_full_forward_decoding() -> None:
    model = build("llama").eval()
    pk.apply(model, pk.CPT(**FIELDS))  # type: ignore[arg-type]
    with torch.no_grad():
        module_of(model).delta_embedding.weight.normal_()
    model.generation_config.eos_token_id = None
    ids = inputs()["input_ids"]
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)
