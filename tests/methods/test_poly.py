"""Poly against HF PEFT: initialisation, the routed forward (evaluation and training), gradients, task ids in calls and
in generate, files both ways, several adapters, refused merging and layers, and where peftkit deliberately differs, on
a tiny Llama and BERT."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_prompt import batch

import peftkit as pk
from peftkit.errors import ConfigError, MergeError, UnknownFieldError, UnsupportedLayerError
from peftkit.io.hf_format import adapter_state_dict
from peftkit.methods.poly import PolyLayer
from peftkit.train.config import PEFT_METHODS

from models import (
    assert_files_match_hf,
    assert_same_grads_as_hf,
    assert_same_tensors_as_hf,
    build,
    hf_pair,
    randomize_adapters,
    randomize_trainable,
    run,
)

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
TASKS = torch.tensor([2, 0])  # one task per example of batch("llama")


def pair(arch: str = "llama", seed: int = 1, **fields: Any) -> tuple[torch.nn.Module, Any]:
    """peftkit's and HF PEFT's Poly adapters from the same global seed (``fields`` in peftkit's names)."""
    fields = {"target_modules": TARGETS, "rank": 2, "n_tasks": 3, **fields}
    theirs = {("r" if k == "rank" else k): v for k, v in fields.items()}
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"  # HF PEFT's plain PeftModel does not pass task_ids on
    return hf_pair(lambda: build(arch), pk.Poly(**fields), peft.PolyConfig(task_type=task, **theirs), seed=seed)


def copied(ours: torch.nn.Module, hf: Any, seed: int = 0) -> None:
    """Random tensors in each adapter of ``ours`` (B and the routing logits included), copied into ``hf``."""
    randomize_adapters(ours, seed=seed)
    for name in pk.list_adapters(ours):
        state = {k: v.detach().clone() for k, v in adapter_state_dict(ours, name).items()}
        peft.set_peft_model_state_dict(hf, state, adapter_name=name)


@pytest.mark.parametrize(("fields", "arch"), [
    ({}, "llama"),
    ({"init_weights": False, "n_skills": 3, "n_splits": 2}, "llama"),
    ({"n_splits": 4, "rank": 3, "n_tasks": 1}, "llama"),
    ({"target_modules": ["query", "value", "intermediate.dense"], "init_weights": False}, "bert"),
])
def test_initial_tensors_and_outputs_equal_hf(fields: dict[str, Any], arch: str) -> None:
    ours, hf = pair(arch, **fields)
    assert_same_tensors_as_hf(ours, hf)  # the same draws from the global generator, in the same order
    inputs = {**batch(arch), "task_ids": TASKS.clamp(max=fields.get("n_tasks", 3) - 1)}
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-6)


def test_half_precision_base_as_in_hf() -> None:
    """Over a bf16 base the tensors are drawn in fp32, rounded to bf16 and kept in fp32, as HF PEFT does."""
    base_ours, base_hf = build("llama").to(torch.bfloat16), build("llama").to(torch.bfloat16)
    torch.manual_seed(4)
    mine = pk.apply(base_ours, pk.Poly(target_modules=TARGETS, rank=2, n_tasks=3, init_weights=False)).eval()
    torch.manual_seed(4)
    theirs = peft.get_peft_model(base_hf, peft.PolyConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=2,
                                                          n_tasks=3, init_weights=False)).eval()
    assert_same_tensors_as_hf(mine, theirs)
    assert all(p.dtype == torch.float32 for p in mine.parameters() if p.requires_grad)
    inputs = {**batch("llama"), "task_ids": TASKS}
    with torch.no_grad():
        assert torch.equal(mine(**inputs).logits, theirs(**inputs).logits)


def test_update_is_the_routed_mixture_of_skills() -> None:
    """(1/r)·x Aᵢ Bᵢ with each head's skills mixed by σ(Z[tᵢ]) normalised, written out example by example."""
    layer = PolyLayer(torch.nn.Linear(6, 4))
    layer.add("default", rank=3, n_tasks=2, n_skills=5, n_splits=2, init_weights=False)
    layer.set_active(["default"])
    layer.eval()
    x = torch.randn(2, 3, 6)
    layer.task_ids = torch.tensor([1, 0])
    a, b = layer.poly_lora_A["default"].detach(), layer.poly_lora_B["default"].detach()
    logits = layer.poly_router["default"].module_logits.detach()
    for i, task in enumerate([1, 0]):
        w = torch.sigmoid(logits[task].view(2, 5))
        w = w / w.sum(-1, keepdim=True)
        heads_a = [sum(w[q, s] * a[q, s] for s in range(5)) for q in range(2)]  # each (in/Q, r)
        heads_b = [sum(w[q, s] * b[q, s] for s in range(5)) for q in range(2)]  # each (r, out/Q)
        want = layer.base_layer(x[i]) + x[i] @ torch.cat(heads_a, 0) @ torch.cat(heads_b, 1) / 3
        torch.testing.assert_close(layer(x)[i], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_forward_and_gradients_equal_hf(training: bool) -> None:
    """Training mode samples the routing (relaxed Bernoulli): the same global seed gives the same samples."""
    ours, hf = pair(n_splits=2, n_skills=3)
    copied(ours, hf)
    ours.train(training)
    hf.train(training)
    inputs = {**batch("llama"), "task_ids": TASKS}

    def forward(model: torch.nn.Module) -> torch.Tensor:
        torch.manual_seed(7)
        return model(**inputs).logits

    with torch.no_grad():
        torch.testing.assert_close(forward(ours), forward(hf), rtol=0, atol=1e-6)
    assert_same_grads_as_hf(ours, hf, forward)


def test_task_ids_route_each_example_and_are_checked() -> None:
    ours, hf = pair()
    copied(ours, hf)
    ours.eval()
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        both = ours(input_ids=ids, task_ids=TASKS).logits
        for row, task in enumerate(TASKS.tolist()):  # each example as if alone: the rows do not mix
            alone = ours(input_ids=ids[row:row + 1], task_ids=torch.tensor([task])).logits[0]
            torch.testing.assert_close(both[row], alone, rtol=0, atol=1e-5)
        assert not torch.allclose(both, ours(input_ids=ids, task_ids=torch.tensor([1, 1])).logits)
    with pytest.raises(ConfigError, match=r"n_tasks=3: call the model with task_ids.*2 values in \[0, 3\)"):
        ours(input_ids=ids)
    with pytest.raises(ConfigError, match=r"task_ids=\[0, 3\] has values outside \[0, 3\)"):
        ours(input_ids=ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"task_ids of shape \(3,\).*shape \(2,\)"):
        ours(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="dtype torch.float32"):
        ours(input_ids=ids, task_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match=r"task_ids=\[0, 1\] is a list: pass an integer tensor"):
        ours(input_ids=ids, task_ids=[0, 1])


def test_one_task_needs_no_task_ids() -> None:
    """Deliberately unlike HF PEFT (which raises): with n_tasks=1 a call without task_ids routes every example to
    task 0, the only task, so training and evaluation need no task column."""
    ours, hf = pair(n_tasks=1)
    copied(ours, hf)
    ours.eval()
    inputs = batch("llama")
    with torch.no_grad():
        want = hf(**inputs, task_ids=torch.zeros(2, dtype=torch.long)).logits
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="task_ids should not be None"):
            hf(**inputs)


def test_generate_takes_task_ids_as_hf() -> None:
    ours, hf = pair()
    copied(ours, hf)
    ours.eval()
    ids = batch("llama")["input_ids"]
    for tasks in (TASKS, torch.tensor([1, 1])):
        got = ours.generate(input_ids=ids, task_ids=tasks, max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = hf.generate(input_ids=ids, task_ids=tasks, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)


def test_gradient_checkpointing_and_copies_keep_the_task_ids() -> None:
    """Recomputed blocks route as in the forward (HF PEFT raises there: its task ids are gone by the backward), and a
    copy of the model routes its own layers."""
    ours, hf = pair()
    randomize_trainable(ours, scale=0.3, seed=0)
    inputs = {**batch("llama"), "task_ids": TASKS}
    hf.train().gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="task_ids should not be None"):
        hf(**inputs).loss.backward()

    def grads(model: torch.nn.Module, checkpointing: bool) -> list[torch.Tensor]:
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        model.train()(**inputs).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    clone = copy.deepcopy(ours)
    for a, b in zip(grads(clone, True), grads(ours, False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_several_adapters_switch_disable_and_delete_as_hf() -> None:
    ours, hf = pair(seed=1)
    torch.manual_seed(2)
    pk.apply(ours, pk.Poly(target_modules=TARGETS, rank=3, n_tasks=3, n_skills=2, init_weights=False), name="other")
    torch.manual_seed(2)
    hf.add_adapter("other", peft.PolyConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=3, n_tasks=3,
                                            n_skills=2, init_weights=False))
    copied(ours, hf)
    ours.eval()
    hf.eval()  # its new adapter's router came in training mode
    inputs = {**batch("llama"), "task_ids": TASKS}
    with torch.no_grad():
        for names in (["other"], ["default", "other"], ["default"]):
            hf.base_model.set_adapter(names)
            pk.set_adapter(ours, names)
            torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits, rtol=0, atol=1e-6)
        with pk.disable_adapters(ours):
            assert torch.equal(ours(**inputs).logits, build("llama")(**batch("llama")).logits)
        want = ours(**inputs).logits
        pk.delete_adapter(ours, "other")
        assert pk.list_adapters(ours) == ["default"] and torch.equal(ours(**inputs).logits, want)


def test_files_load_both_ways_with_equal_logits(tmp_path: Path) -> None:
    ours, hf = pair(n_splits=2, n_skills=3, init_weights=False)
    copied(ours, hf)
    ours.eval()
    # HF PEFT writes target_modules in its set's order; the tensor keys show that both select the same modules.
    assert_files_match_hf(hf, ours, "llama", {**batch("llama"), "task_ids": TASKS}, tmp_path, loose=("target_modules",))
    for saved in ("hf", "pk"):
        assert sorted(json.loads((tmp_path / saved / "adapter_config.json").read_text())["target_modules"]) == \
            sorted(TARGETS)


def test_merging_is_refused_and_unloading_restores_the_plain_model() -> None:
    ours, hf = pair()
    randomize_trainable(ours, scale=0.3, seed=0)
    ours.eval()
    inputs = {**batch("llama"), "task_ids": TASKS}
    with torch.no_grad():
        want = ours(**inputs).logits
        with pytest.raises(MergeError, match="Poly adapters.*cannot be merged.*task routes to.*merge=False"):
            pk.merge(ours)
        with pytest.raises(MergeError, match="cannot be merged"):
            pk.unload(ours, merge=True)
        assert torch.equal(ours(**inputs).logits, want)  # refused before anything changed
        with pytest.raises(NotImplementedError):  # HF PEFT cannot merge Poly either
            hf.merge_and_unload()
        plain = pk.unload(ours, merge=False)
        assert "_peftkit_poly_hook" not in plain.__dict__ and "prepare_inputs_for_generation" not in plain.__dict__
        assert not plain._forward_pre_hooks
        assert torch.equal(run(plain, "llama"), run(build("llama"), "llama"))


def test_unsupported_layers_are_refused_as_hf_refuses_them() -> None:
    with pytest.raises(UnsupportedLayerError, match="Poly cannot adapt.*Conv1D|Conv1D.*cannot"):
        pk.apply(build("gpt2"), pk.Poly(target_modules=["c_attn"]))
    with pytest.raises(TypeError):  # HF PEFT: nn.Linear only
        peft.get_peft_model(build("gpt2"), peft.PolyConfig(target_modules=["c_attn"]))
    model = build("llama")
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        pk.apply(model, pk.Poly(target_modules=["embed_tokens"]))
    assert not any(isinstance(m, PolyLayer) for m in model.modules()) and not model._forward_pre_hooks


def test_splits_must_divide_every_target_before_the_model_changes() -> None:
    """Deliberately unlike HF PEFT, which builds such an adapter and fails in the forward."""
    model = build("llama")
    with pytest.raises(ConfigError, match=r"n_splits=3 does not divide the sizes \(32, 32\).*q_proj"):
        pk.apply(model, pk.Poly(target_modules=TARGETS, n_splits=3))
    assert not any(isinstance(m, PolyLayer) for m in model.modules())
    hf = peft.get_peft_model(build("llama"), peft.PolyConfig(task_type="CAUSAL_LM", target_modules=TARGETS,
                                                             n_tasks=3, n_splits=3))
    with pytest.raises(RuntimeError):
        hf(**batch("llama"), task_ids=TASKS)


@pytest.mark.parametrize(("fields", "match"), [
    ({"rank": 0}, r"rank=0 must be a positive integer"),
    ({"n_tasks": -1}, r"n_tasks=-1 must be a positive integer"),
    ({"n_skills": 2.5}, r"n_skills=2.5 must be a positive integer"),
    ({"n_splits": True}, r"n_splits=True must be a positive integer"),
    ({"poly_type": "mhr"}, r"poly_type='mhr' is not supported; use one of \('poly',\)"),
    ({"init_weights": "yes"}, r"init_weights='yes' must be True or False"),
])
def test_invalid_fields_are_refused_by_name(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.Poly(target_modules=TARGETS, **fields)


def test_default_targets_and_training_config_name() -> None:
    model = pk.apply(build("llama"), pk.Poly())  # LoRA's defaults, as HF PEFT's mapping
    assert sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, PolyLayer)}) == \
        ["q_proj", "v_proj"]
    assert PEFT_METHODS["poly"] == "Poly"
    with pytest.raises(UnknownFieldError, match="'r' is HF PEFT's name: use rank"):
        pk.Poly(r=4)  # type: ignore[call-arg]


def test_quantized_linear_layers_take_poly() -> None:
    model = build("llama")
    pk.quantize(model, bits=4, quant_type="nf4")
    inputs = batch("llama")
    with torch.no_grad():
        base = model(**inputs).logits
        pk.apply(model, pk.Poly(target_modules=TARGETS, rank=2, n_tasks=3, init_weights=False)).eval()
        assert not torch.allclose(model(**inputs, task_ids=TASKS).logits, base)
        with pk.disable_adapters(model):
            assert torch.equal(model(**inputs, task_ids=TASKS).logits, base)


@pytest.mark.parametrize("poly_first", [True, False])
def test_a_multitask_prompt_beside_poly_reads_the_same_task_ids(poly_first: bool) -> None:
    configs = [pk.Poly(target_modules=TARGETS, rank=2, n_tasks=3, init_weights=False),
               pk.MultitaskPromptTuning(num_virtual_tokens=2, num_tasks=3)]
    model = build("llama")
    for name, config in zip(("a", "b"), configs if poly_first else configs[::-1], strict=True):
        pk.apply(model, config, name=name)
    pk.set_adapter(model, ["a", "b"])
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        both = model(input_ids=ids, task_ids=TASKS).logits
        for row, task in enumerate(TASKS.tolist()):
            alone = model(input_ids=ids[row:row + 1], task_ids=torch.tensor([task])).logits[0]
            torch.testing.assert_close(both[row], alone, rtol=0, atol=1e-5)
        with pk.disable_adapters(model):
            assert torch.equal(model(input_ids=ids, task_ids=TASKS).logits, build("llama")(input_ids=ids).logits)
        assert model.generate(input_ids=ids, task_ids=TASKS, max_new_tokens=2, do_sample=False,
                              pad_token_id=0).shape == (2, 8)
