"""Sequence classifiers train their head in full (``modules_to_save``) by default, as HF PEFT does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import adapter_layers, get_state

from models import build

peft = pytest.importorskip("peft")

INPUTS = {"input_ids": torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(3)),
          "attention_mask": torch.ones(2, 6, dtype=torch.long)}
METHODS = {
    "lora": (lambda **kw: pk.LoRA(target_modules=["query", "value"], rank=2, **kw),
             lambda **kw: peft.LoraConfig(target_modules=["query", "value"], r=2, **kw)),
    "oft": (lambda **kw: pk.OFT(target_modules=["query", "value"], oft_block_size=8, **kw),
            lambda **kw: peft.OFTConfig(target_modules=["query", "value"], oft_block_size=8, **kw)),
    "prompt": (lambda **kw: pk.PromptTuning(num_virtual_tokens=3, **kw),
               lambda **kw: peft.PromptTuningConfig(num_virtual_tokens=3, **kw)),
}


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("method", list(METHODS))
def test_bert_classifier_is_trained_and_saved_like_hf_peft(method: str, tmp_path) -> None:
    ours_config, hf_config = METHODS[method]
    config = ours_config()
    model = pk.apply(build("bert"), config)  # task_type inferred from BertForSequenceClassification
    assert isinstance(model.classifier, ModulesToSave)
    assert config.modules_to_save == []  # the user's config is left as given
    assert get_state(model).configs["default"].modules_to_save == ["classifier"]
    hf = peft.get_peft_model(build("bert"), hf_config(task_type="SEQ_CLS"))
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())

    _randomize(model)
    pk.save_adapter(model, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        expected = model(**INPUTS).logits
        with pk.disable_adapters(model):
            assert not torch.allclose(model(**INPUTS).logits, expected, atol=1e-4)
        assert torch.allclose(back(**INPUTS).logits, expected, atol=1e-5)

    _randomize(hf)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build("bert"), tmp_path / "hf")
    assert isinstance(loaded.classifier, ModulesToSave)
    with torch.no_grad():
        assert torch.allclose(loaded(**INPUTS).logits, hf(**INPUTS).logits, atol=1e-5)


def test_explicit_choices_win() -> None:
    model = pk.apply(build("bert"), pk.LoRA(target_modules=["query"], modules_to_save=["pooler"]))
    assert isinstance(model.bert.pooler, ModulesToSave) and isinstance(model.classifier, nn.Linear)
    model = pk.apply(build("bert"), pk.LoRA(target_modules=["query"], task_type="FEATURE_EXTRACTION"))
    assert isinstance(model.classifier, nn.Linear)
    # With a task that has no head of its own, a targeted head is adapted like any other layer.
    model = pk.apply(build("bert"), pk.LoRA(target_modules=["query", "classifier"], task_type="FEATURE_EXTRACTION"))
    assert type(model.classifier).__name__ == "LoRALinear"
    assert get_state(model).configs["default"].modules_to_save == []


def test_causal_lm_gets_no_head_and_llama_classifier_gets_score() -> None:
    model = pk.apply(build("llama"), pk.LoRA(target_modules=["q_proj"]))
    assert not any(isinstance(m, ModulesToSave) for m in model.modules())
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cls = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, vocab_size=96, num_labels=2,
                                                     pad_token_id=0))
    pk.apply(cls, pk.LoRA(target_modules=["q_proj"]))
    assert isinstance(cls.score, ModulesToSave)


def test_an_hf_peft_file_without_the_head_loads_without_it(tmp_path) -> None:
    """HF PEFT trains no head without task_type (and never with trainable tokens): such files lack the head, and
    loading one must not expect it."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    for i, config in enumerate([LoraConfig(target_modules=["query"], init_lora_weights=False),
                                TrainableTokensConfig(token_indices=[5, 7], task_type="SEQ_CLS")]):
        hf = get_peft_model(build("bert"), config).eval()
        hf.save_pretrained(tmp_path / str(i))
        ours = pk.load_adapter(build("bert"), tmp_path / str(i))
        assert not get_state(ours).saved["default"]
        inputs = {"input_ids": torch.tensor([[1, 5, 7, 9, 2]])}
        with torch.no_grad():
            torch.testing.assert_close(ours(**inputs).logits, hf(**inputs).logits)


def test_trainable_tokens_train_no_head_as_in_hf_peft(tmp_path) -> None:
    model = pk.apply(build("bert"), pk.TrainableTokens(token_indices=[5, 7]))
    assert not get_state(model).saved["default"]
    pk.save_adapter(model, tmp_path)
    assert "modules_to_save" not in json.loads((tmp_path / "adapter_config.json").read_text())


def _bert_head_model(cls_name: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=96, max_position_embeddings=64)
    return getattr(transformers, cls_name)(config).eval()


def _head_outputs(model: nn.Module) -> torch.Tensor:
    out = model(**INPUTS)
    return out.start_logits if getattr(out, "logits", None) is None else out.logits


@pytest.mark.parametrize("cls_name,task,head", [("BertForTokenClassification", "TOKEN_CLS", "classifier"),
                                                ("BertForQuestionAnswering", "QUESTION_ANS", "qa_outputs")])
@pytest.mark.parametrize("method", list(METHODS))
def test_token_classifier_and_question_answering_heads_train_as_in_hf_peft(
        cls_name: str, task: str, head: str, method: str, tmp_path) -> None:
    """HF PEFT trains these heads for TOKEN_CLS and QUESTION_ANS too, and its loader needs them in the file."""
    ours_config, hf_config = METHODS[method]
    model = pk.apply(_bert_head_model(cls_name), ours_config())  # task_type inferred from the model class
    assert isinstance(getattr(model, head), ModulesToSave)
    hf = peft.get_peft_model(_bert_head_model(cls_name), hf_config(task_type=task))
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())
    _randomize(model)
    pk.save_adapter(model, tmp_path)
    back = peft.PeftModel.from_pretrained(_bert_head_model(cls_name), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(_head_outputs(back), _head_outputs(model), atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_an_adapter_leaving_the_head_to_the_base_model_loads_in_hf_peft(method: str, tmp_path) -> None:
    """HF PEFT's sequence classifier adds its head to modules_to_save when loading and then needs its weights:
    they are written as the base head's, so its copy computes what the base head does."""
    ours_config, _ = METHODS[method]
    model = pk.apply(build("bert"), ours_config(modules_to_save=["pooler"]))
    assert isinstance(model.classifier, nn.Linear)  # the explicit choice wins: the head stays frozen
    _randomize(model)
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["pooler", "classifier"]
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path)).eval()
    again = pk.load_adapter(build("bert"), tmp_path)
    with torch.no_grad():
        expected = model(**INPUTS).logits
        assert torch.allclose(back(**INPUTS).logits, expected, atol=1e-5)
        assert torch.allclose(again(**INPUTS).logits, expected, atol=1e-5)
    assert pk.list_adapters(model) == ["default"] and isinstance(model.classifier, nn.Linear)  # saving changed nothing


def test_two_adapters_with_their_own_head_cannot_be_active_together() -> None:
    # One copy computes the head's output; activating both would silently ignore the second's (HF PEFT refuses too).
    model = pk.apply(build("bert"), METHODS["lora"][0]())
    pk.apply(model, METHODS["lora"][0](), name="other")
    pk.apply(model, pk.LoRA(target_modules=["key"], rank=2, modules_to_save=["bert.pooler.dense"]), name="pooler")
    _randomize(model)
    before = model(**INPUTS).logits
    with pytest.raises(pk.errors.AdapterStateError, match=r"\['default', 'other'\].*classifier"):
        pk.set_adapter(model, ["default", "other"])
    assert pk.active_adapters(model) == ["default"]
    assert torch.equal(model(**INPUTS).logits, before)
    hf = peft.get_peft_model(build("bert"), METHODS["lora"][1](task_type="SEQ_CLS"))
    hf.add_adapter("other", METHODS["lora"][1](task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="Only one adapter"):
        hf.base_model.set_adapter(["default", "other"])
    pk.set_adapter(model, ["default", "pooler"])  # different modules: both copies compute
    assert model.bert.pooler.dense.current() is model.bert.pooler.dense.copies["pooler"]
    assert model.classifier.current() is model.classifier.copies["default"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_bias_all_trains_the_head_copy_and_leaves_its_original_frozen(method: str, tmp_path) -> None:
    """``bias="all"`` trains every bias but the saved head's original (its copy trains), as HF PEFT."""
    if method == "lora":
        ours = pk.apply(build("bert"), METHODS["lora"][0](bias="all"))
        hf = peft.get_peft_model(build("bert"), METHODS["lora"][1](bias="all", task_type="SEQ_CLS"))
    else:
        ours = pk.apply(build("bert"), pk.AdaLoRA(target_modules=["query"], init_rank=4, target_rank=2, total_step=10,
                                                  bias="all"))
        hf = peft.get_peft_model(build("bert"), peft.AdaLoraConfig(target_modules=["query"], init_r=4, target_r=2,
                                                                   total_step=10, bias="all", task_type="SEQ_CLS"))
    trainable = {n.removeprefix("base_model.model.").replace(".modules_to_save.", ".copies.")
                 for n, p in hf.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    assert not ours.classifier.base_layer.bias.requires_grad and ours.classifier.copies["default"].bias.requires_grad
    assert pk.count_parameters(ours) == tuple(hf.get_nb_trainable_parameters())
    _randomize(ours)
    pk.save_adapter(ours, tmp_path)  # the original's bias is still saved, as HF PEFT saves it
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.classifier.original_module.bias"], ours.classifier.base_layer.bias)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])  # None: inferred from BertForSequenceClassification
def test_a_targeted_head_is_trained_in_full_as_in_hf_peft(task_type: str | None, tmp_path) -> None:
    """HF PEFT's sequence classifier keeps its head out of the LoRA targets and trains it in full: the same module
    copies, and the files of each library load in the other with the same logits."""
    targets = ["query", "classifier"]
    model = pk.apply(build("bert"), pk.LoRA(target_modules=targets, rank=2, task_type=task_type))
    hf = peft.get_peft_model(build("bert"), peft.LoraConfig(target_modules=targets, r=2, task_type="SEQ_CLS"))
    assert isinstance(model.classifier, ModulesToSave)
    assert type(hf.base_model.model.classifier).__name__ == "ModulesToSaveWrapper"
    assert sorted(get_state(model).targets["default"]) == sorted(
        n.removeprefix("base_model.model.").removesuffix(".base_layer")
        for n, m in hf.named_modules() if n.endswith(".base_layer"))
    assert pk.count_parameters(model) == tuple(hf.get_nb_trainable_parameters())

    _randomize(model)
    pk.save_adapter(model, tmp_path / "pk")
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "pk")).eval()
    _randomize(hf)
    hf.eval().save_pretrained(str(tmp_path / "hf"))
    loaded = pk.load_adapter(build("bert"), tmp_path / "hf")
    assert isinstance(loaded.classifier, ModulesToSave)
    with torch.no_grad():
        torch.testing.assert_close(back(**INPUTS).logits, model(**INPUTS).logits)
        torch.testing.assert_close(loaded(**INPUTS).logits, hf(**INPUTS).logits)
        with pk.disable_adapters(model):
            assert not torch.allclose(model(**INPUTS).logits, back(**INPUTS).logits, atol=1e-3)



def test_an_hf_peft_adapter_of_the_head_without_task_type_round_trips(tmp_path) -> None:
    """Without a task type HF PEFT adapts a targeted head like any layer and writes no task type: peftkit loads it as
    such, and saves it again without one, which HF PEFT's loader needs (a SEQ_CLS file would train the head)."""
    hf = peft.get_peft_model(build("bert"), peft.LoraConfig(target_modules=["query", "classifier"], r=2,
                                                            init_lora_weights=False)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = pk.load_adapter(build("bert"), tmp_path / "hf")
    assert type(ours.classifier).__name__ == "LoRALinear"
    pk.save_adapter(ours, tmp_path / "pk")
    assert json.loads((tmp_path / "pk" / "adapter_config.json").read_text())["task_type"] is None
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path / "pk")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**INPUTS).logits, hf(**INPUTS).logits)
        torch.testing.assert_close(back(**INPUTS).logits, hf(**INPUTS).logits)

def test_a_targeted_head_is_copied_beside_explicit_modules_to_save(tmp_path) -> None:
    """HF PEFT adds the head to an explicit ``modules_to_save`` too, and so excludes it from the targets."""
    config = pk.LoRA(target_modules=["query", "classifier"], rank=2, modules_to_save=["pooler"])
    model = pk.apply(build("bert"), config)
    assert isinstance(model.classifier, ModulesToSave) and isinstance(model.bert.pooler, ModulesToSave)
    assert get_state(model).configs["default"].modules_to_save == ["pooler", "classifier"]
    assert config.modules_to_save == ["pooler"]  # the user's config is left as given
    _randomize(model)
    pk.save_adapter(model, tmp_path)
    back = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**INPUTS).logits, model(**INPUTS).logits)


def test_targeting_only_the_head_is_refused_before_the_model_changes() -> None:
    model = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.errors.ConfigError, match=r"select only \['classifier'\].*'SEQ_CLS'.*FEATURE_EXTRACTION"):
        pk.apply(model, pk.LoRA(target_modules=["classifier"], rank=2))
    assert not get_state(model).configs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.classifier, nn.Linear)
    with pytest.raises(ValueError, match="only targeted modules that are marked to be saved"):
        peft.get_peft_model(build("bert"), peft.LoraConfig(target_modules=["classifier"], task_type="SEQ_CLS"))


def test_inspect_lists_a_targeted_head_once_as_a_full_copy() -> None:
    report = pk.inspect(build("bert"), pk.LoRA(target_modules=["query", "classifier"], rank=2))
    model = pk.apply(build("bert"), pk.LoRA(target_modules=["query", "classifier"], rank=2))
    assert report.added_params == pk.count_parameters(model)[0]
    assert [r.name for r in report.rows].count("classifier") == 1


def _two_heads() -> nn.Module:
    model = build("bert")
    for name in ("a", "b"):
        pk.apply(model, METHODS["lora"][0](), name=name)
        pk.set_adapter(model, name)
        _randomize(model)
    return model


def test_unload_of_a_named_adapter_keeps_its_own_head_copy() -> None:
    model = _two_heads()
    pk.set_adapter(model, "b")
    with torch.no_grad():
        expected = model(**INPUTS).logits
        pk.set_adapter(model, "a")  # another adapter active: unload merges "b" and must take b's head
        plain = pk.unload(model, names=["b"])
        assert type(plain.classifier) is nn.Linear
        torch.testing.assert_close(plain(**INPUTS).logits, expected)


def test_merging_two_adapters_with_their_own_head_is_refused_before_any_change() -> None:
    model = _two_heads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: pk.merge(model, ["a", "b"]), lambda: pk.unload(model, names=["a", "b"])):
        with pytest.raises(pk.errors.MergeError, match=r"\['a', 'b'\] each train their own copy of classifier"):
            call()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(layer.merged_adapters for _, layer in adapter_layers(model))
