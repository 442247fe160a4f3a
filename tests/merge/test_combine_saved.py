"""``pk.combine`` of adapters that train modules in full (``modules_to_save``): the copies combine as task vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import get_state, list_adapters
from peftkit.errors import ConfigError

from models import build, randomize_trainable

peft = pytest.importorskip("peft")
from peft.utils import merge_utils as hf_mu  # noqa: E402  (HF PEFT's own functions: the reference)

INPUTS = {"input_ids": torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(3))}
WEIGHTS = {"a": 0.6, "b": -0.3}


def _two_adapters(kind: type[pk.LoRA] = pk.LoRA) -> nn.Module:
    """BERT classifier: "a" trains the head (added for SEQ_CLS), "b" the head and the pooler; both adapt query."""
    model = build("bert")
    pk.apply(model, kind(target_modules=["query", "value"], rank=2), name="a")
    pk.apply(model, kind(target_modules=["query"], rank=2, modules_to_save=["classifier", "pooler"]), name="b")
    for name in ("a", "b"):
        pk.set_adapter(model, name)
        randomize_trainable(model, seed=len(name) + ord(name))
    return model


def _copies(model: nn.Module, qualname: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    wrapper = model.get_submodule(qualname)
    assert isinstance(wrapper, ModulesToSave)
    return wrapper.base_layer.state_dict(), {a: c.state_dict() for a, c in wrapper.copies.items()}


def _linear(base: torch.Tensor, copies: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return base + sum(w * (copies[a] - base) for a, w in weights.items() if a in copies)


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "task_arithmetic"])
def test_linear_family_gives_base_plus_weighted_deltas(method: str) -> None:
    model = _two_adapters()
    pk.combine(model, WEIGHTS, method=method, name="mix")
    assert get_state(model).configs["mix"].modules_to_save == ["classifier", "pooler"]
    for qualname in ("classifier", "bert.pooler"):  # the pooler: only "b" trains it, "a" adds nothing
        base, copies = _copies(model, qualname)
        for key in base:
            expected = _linear(base[key], {a: c[key] for a, c in copies.items() if a != "mix"}, WEIGHTS)
            torch.testing.assert_close(copies["mix"][key], expected, rtol=0, atol=1e-6)
    assert not torch.equal(_copies(model, "classifier")[1]["mix"]["weight"], _copies(model, "classifier")[0]["weight"])


@pytest.mark.parametrize(("method", "hf_fn", "kwargs"), [
    ("ties", "ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties_svd", "ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "magnitude_prune", {"density": 0.5}),
])
def test_trimming_methods_apply_hf_peft_merge_functions_to_the_full_deltas(
        method: str, hf_fn: str, kwargs: dict[str, Any]) -> None:
    model = _two_adapters()
    pk.combine(model, WEIGHTS, method=method, name="mix", **kwargs)
    base, copies = _copies(model, "classifier")
    for key in base:
        deltas = torch.stack([copies[a][key] - base[key] for a in WEIGHTS])
        expected = base[key] + getattr(hf_mu, hf_fn)(deltas, torch.tensor(list(WEIGHTS.values())), **kwargs)
        torch.testing.assert_close(copies["mix"][key], expected, rtol=0, atol=1e-6)


def test_dare_drops_entries_of_the_deltas_reproducibly() -> None:
    model = _two_adapters()
    pk.combine(model, {"b": 1.0}, method="dare_linear", density=0.5, seed=4, name="mix")
    pk.combine(model, {"b": 1.0}, method="dare_linear", density=0.5, seed=4, name="again")
    base, copies = _copies(model, "bert.pooler")
    delta = copies["b"]["dense.weight"] - base["dense.weight"]
    kept = copies["mix"]["dense.weight"] - base["dense.weight"]
    dropped = kept == 0
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(kept[~dropped], delta[~dropped] / 0.5)  # survivors rescaled by 1/density
    assert torch.equal(copies["again"]["dense.weight"], copies["mix"]["dense.weight"])


def test_dora_sources_combine_their_copies_too() -> None:
    model = _two_adapters(pk.DoRA)
    pk.combine(model, WEIGHTS, method="cat", name="mix")
    base, copies = _copies(model, "classifier")
    torch.testing.assert_close(copies["mix"]["weight"],
                               _linear(base["weight"], {a: copies[a]["weight"] for a in WEIGHTS}, WEIGHTS))


def test_combined_adapter_round_trips_through_both_libraries(tmp_path: Path) -> None:
    model = _two_adapters()
    pk.combine(model, WEIGHTS, method="ties", density=0.7, name="mix")
    pk.set_adapter(model, "mix")
    pk.save_adapter(model, tmp_path, name="mix")
    hf = peft.PeftModel.from_pretrained(build("bert"), str(tmp_path)).eval()
    ours = pk.load_adapter(build("bert"), tmp_path)
    with torch.no_grad():
        expected = model(**INPUTS).logits
        torch.testing.assert_close(hf(**INPUTS).logits, expected)
        torch.testing.assert_close(ours(**INPUTS).logits, expected)
        pk.set_adapter(model, "a")
        assert not torch.allclose(model(**INPUTS).logits, expected, atol=1e-4)


def test_sources_without_copies_give_the_new_adapter_none(tmp_path: Path) -> None:
    """HF PEFT adapters saved without a task type train no head: nor does their mix (no fresh copy of the head)."""
    hf = peft.get_peft_model(build("bert"), peft.LoraConfig(target_modules=["query"], r=2, init_lora_weights=False))
    hf.save_pretrained(str(tmp_path))
    model = build("bert")
    for name in ("a", "b"):
        pk.load_adapter(model, tmp_path, name=name)
    pk.combine(model, WEIGHTS, name="mix")
    assert get_state(model).saved["mix"] == [] and isinstance(model.classifier, nn.Linear)


@pytest.mark.parametrize(("config", "match"), [
    ({"bias": "all"}, r"adapter 'a' also trains the base model's biases or embedding rows \(bias='all'"),
    ({"trainable_token_indices": [3]}, r"trainable_token_indices=\[3\]\), which combine does not mix"),
])
def test_adapters_training_biases_or_token_rows_are_refused(config: dict[str, Any], match: str) -> None:
    model = build("bert")
    for name in ("a", "b"):
        pk.apply(model, pk.LoRA(target_modules=["query"], rank=2, **config), name=name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        pk.combine(model, WEIGHTS, name="mix")
    assert list_adapters(model) == ["a", "b"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
