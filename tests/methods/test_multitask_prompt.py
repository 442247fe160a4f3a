"""Multi-task prompt tuning: HF PEFT parity (logits, loss, tensors, config JSON, parameter count) both ways on a
batch mixing tasks, per-example task selection, the task_ids hook, source-task inits, training, validation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_prompt import TASKS, batch

import peftkit as pk
from peftkit.errors import CheckpointError, ConfigError, MergeError, ShapeMismatchError
from peftkit.methods.multitask_prompt import MultitaskPromptEmbedding

from models import build, randomize_trainable, train_losses

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "bert"]  # encoder-decoder models are refused (see the last tests)
M, T, R = 3, 3, 2
TASK_IDS = torch.tensor([2, 0])  # the two rows of ``batch`` belong to different tasks
HF_ONLY = {"peft_version", "auto_mapping"}  # HF PEFT's version and auto-class hook say nothing about the adapter
KEYS = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}


def hf_model(arch: str, **kw: object) -> torch.nn.Module:
    """An HF PEFT multi-task prompt model, its trainable tensors random (so C R is far from zero)."""
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    config = peft.MultitaskPromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=M, num_tasks=T, num_ranks=R,
                                              **extra, **kw)
    model = peft.get_peft_model(build(arch), config)
    randomize_trainable(model)
    return model.eval()


def ours_config(arch: str, **kw: object) -> pk.MultitaskPromptTuning:
    return pk.MultitaskPromptTuning(num_virtual_tokens=M, num_tasks=T, num_ranks=R,  # type: ignore[arg-type]
                                    modules_to_save=["classifier"] if arch == "bert" else (), **kw)


def module_of(model: torch.nn.Module) -> MultitaskPromptEmbedding:
    module = model.prompt_encoder.prompt_modules["default"]
    assert isinstance(module, MultitaskPromptEmbedding)
    return module


def saved_json(directory) -> dict[str, object]:
    data = json.loads((directory / "adapter_config.json").read_text())
    data["modules_to_save"] = sorted(set(data["modules_to_save"] or []) - {"score"})  # HF lists both head names
    return {k: v for k, v in data.items() if k not in HF_ONLY}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor = TASK_IDS):
    with torch.no_grad():
        return model(**inputs, task_ids=task_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_parity_both_ways(arch: str, tmp_path) -> None:
    hf = hf_model(arch)
    inputs = batch(arch)
    want = logits(hf, inputs)
    hf.save_pretrained(str(tmp_path / "hf"))

    # HF → peftkit: same logits and loss on a batch whose rows use different tasks.
    loaded = pk.load_adapter(build(arch), tmp_path / "hf")
    got = logits(loaded, inputs)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)

    # peftkit → HF: the same keys, tensors and config JSON, and HF PEFT computes the same logits from them.
    pk.save_adapter(loaded, tmp_path / "pk")
    assert saved_json(tmp_path / "pk") == saved_json(tmp_path / "hf")
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pk", "hf"))
    prompt_keys = {k for k in theirs if k in KEYS}
    assert prompt_keys == KEYS and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "pk")).eval()
    assert torch.allclose(logits(back, inputs).logits, want.logits, atol=1e-5)

    # A freshly applied adapter (not loaded) saves the same JSON as HF PEFT's fresh one.
    fresh = build(arch)
    pk.apply(fresh, ours_config(arch))
    pk.save_adapter(fresh, tmp_path / "fresh")
    assert saved_json(tmp_path / "fresh") == saved_json(tmp_path / "hf")


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_count_equals_hf(arch: str) -> None:
    ours = build(arch)
    pk.apply(ours, ours_config(arch))
    assert pk.count_parameters(ours) == tuple(hf_model(arch).get_nb_trainable_parameters())
    assert pk.count_parameters(ours)[0] >= M * 32 + T * M * R + T * R * 32


def test_each_example_gets_its_own_task_prompt() -> None:
    model = build("llama")
    pk.apply(model, ours_config("llama"))
    module = module_of(model)
    with torch.no_grad():
        module.prefix_task_cols.normal_()
        module.prefix_task_rows.normal_()
    inputs = {k: v for k, v in batch("llama").items() if k != "labels"}
    mixed = logits(model, inputs).logits
    for row, task in enumerate(TASK_IDS.tolist()):
        alone = logits(model, {k: v[row : row + 1] for k, v in inputs.items()}, torch.tensor([task])).logits
        assert torch.allclose(mixed[row : row + 1], alone, atol=1e-5)
    assert not torch.allclose(mixed, logits(model, inputs, torch.tensor([1, 1])).logits, atol=1e-3)
    # The formula: example i's prompt is P ⊙ (C_t R_t).
    expected = module.embedding.weight * (module.prefix_task_cols[2] @ module.prefix_task_rows[2])
    assert torch.allclose(module.task_prompts(torch.tensor([2]))[0], expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_takes_task_ids_and_equals_full_forward_decoding(arch: str) -> None:
    """generate(task_ids=...) as in HF PEFT: the cached decoding equals greedy full forward passes with the same
    task ids, and the generation hook goes with the adapter."""
    model = build(arch)
    pk.apply(model, ours_config(arch))
    randomize_trainable(model)
    model.generation_config.eos_token_id = None  # decode every step, like the reference
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        got = model.generate(**inputs, task_ids=TASK_IDS, max_new_tokens=3, do_sample=False)
        for _ in range(3):
            step = model(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS).logits[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with pytest.raises(ConfigError, match="needs task_ids"):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert torch.equal(got, ids)
    pk.delete_adapter(model, "default")
    assert "prepare_inputs_for_generation" not in model.__dict__
    with torch.no_grad(), pytest.raises(ValueError, match="task_ids"):  # transformers' own check is back
        model.generate(**inputs, task_ids=TASK_IDS, max_new_tokens=1)


def test_task_ids_are_required_checked_and_never_reach_the_model() -> None:
    model = build("llama")
    inputs = batch("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    pk.apply(model, ours_config("llama"))
    seen: list[str] = []
    model.model.register_forward_pre_hook(lambda mod, args, kw: seen.extend(kw), with_kwargs=True)
    assert logits(model, inputs).logits.shape[1] == 6 + M
    assert "task_ids" not in seen
    with pytest.raises(ConfigError, match=r"needs task_ids.*task_ids=torch.tensor"):
        model(**inputs)
    with pytest.raises(ConfigError, match=r"task_ids=\[0, 3\] has values outside \[0, 3\)"):
        model(**inputs, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        model(**inputs, task_ids=torch.tensor([0, 1, 2]))
    for plain in (1, [0, 1]):  # not a tensor: named, with the form to pass
        given = re.escape(f"task_ids={plain!r} is a {type(plain).__name__}")
        with pytest.raises(ConfigError, match=rf"{given}.*torch.tensor"):
            model(**inputs, task_ids=plain)
    with pk.disable_adapters(model):  # the base model runs, and task_ids are dropped for it
        assert torch.equal(logits(model, inputs).logits, base)
    with pytest.raises(MergeError, match="virtual tokens"):
        pk.merge(model)
    pk.delete_adapter(model, "default")
    assert not hasattr(model, "prompt_encoder")


def test_training_lowers_the_loss_and_reaches_only_the_used_tasks() -> None:
    model = build("llama")
    model.train()
    pk.apply(model, ours_config("llama"))
    module = module_of(model)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    inputs = batch("llama")
    losses = train_losses(model, lambda: model(**inputs, task_ids=TASK_IDS).loss, lr=0.05)
    assert losses[-1] < losses[0] - 0.05
    after = module.state_dict()
    assert not torch.equal(before["embedding.weight"], after["embedding.weight"])
    for key in ("prefix_task_cols", "prefix_task_rows"):
        assert not torch.equal(before[key][[0, 2]], after[key][[0, 2]])
    # Task 1 is in no example, so it gets no gradient (AdamW's weight decay still shrinks it).
    module.zero_grad()
    model(**inputs, task_ids=TASK_IDS).loss.backward()
    for param in (module.prefix_task_cols, module.prefix_task_rows):
        assert param.grad is not None and not param.grad[1].any() and param.grad[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize("init", ["exact_source_task", "average_source_tasks", "only_source_shared"])
def test_source_task_inits_equal_hf(init: str, tmp_path) -> None:
    hf_model("llama").save_pretrained(str(tmp_path / "src"))
    path = str(tmp_path / "src" / "adapter_model.safetensors")
    tasks = T if init == "only_source_shared" else 1
    torch.manual_seed(1)
    hf = peft.get_peft_model(build("llama"), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=M, num_tasks=tasks, num_ranks=R, prompt_tuning_init=init.upper(),
        prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=1))
    ours = build("llama")
    torch.manual_seed(1)
    pk.apply(ours, pk.MultitaskPromptTuning(num_virtual_tokens=M, num_tasks=tasks, num_ranks=R, init=init,
                                            init_state_dict_path=path, init_task=1))
    theirs = hf.prompt_encoder["default"].state_dict()
    mine = module_of(ours).state_dict()
    # HF draws C and R before P; only the source's tensors are compared when some stay random.
    keys = ["embedding.weight"] if init == "only_source_shared" else list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in keys)
    pk.save_adapter(ours, tmp_path / "pk")
    hf.save_pretrained(str(tmp_path / "hf"))
    assert saved_json(tmp_path / "pk") == saved_json(tmp_path / "hf")


def test_source_init_errors(tmp_path) -> None:
    hf_model("llama").save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match="init_task=5 is not a task of the source adapter"):
        pk.apply(build("llama"), pk.MultitaskPromptTuning(num_virtual_tokens=M, num_ranks=R, init="exact_source_task",
                                                          init_state_dict_path=path, init_task=5))
    with pytest.raises(ShapeMismatchError, match="prefix_task_cols"):
        pk.apply(build("llama"), pk.MultitaskPromptTuning(num_virtual_tokens=M, num_ranks=1,
                                                          init="average_source_tasks", init_state_dict_path=path))
    with pytest.raises(CheckpointError, match="is not a file"):
        pk.apply(build("llama"), pk.MultitaskPromptTuning(init="only_source_shared",
                                                          init_state_dict_path=str(tmp_path / "nope.safetensors")))


def test_encoder_decoder_models_are_refused() -> None:
    model = build("t5")
    with pytest.raises(ConfigError, match="not the encoder-decoder T5ForConditionalGeneration; use pk.PromptTuning"):
        pk.apply(model, pk.MultitaskPromptTuning())
    assert not hasattr(model, "prompt_encoder")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ({"num_tasks": 0}, "num_tasks=0"),
    ({"num_ranks": -1}, "num_ranks=-1"),
    ({"init": "sample_vocab"}, "init='sample_vocab' is not supported; use one of"),
    ({"init": "text"}, "init='text' needs init_text"),
    ({"init": "exact_source_task"}, "needs init_state_dict_path"),
    ({"init": "average_source_tasks", "init_state_dict_path": "x.safetensors", "num_tasks": 2}, "set num_tasks=1"),
])
def test_bad_config_values_raise_naming_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        pk.MultitaskPromptTuning(**kwargs)  # type: ignore[arg-type]
