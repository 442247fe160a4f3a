"""Choosing the active adapters: ``set_adapter`` and the names ``merge`` takes."""

from __future__ import annotations

import pytest
import torch

import peftkit as pk
from peftkit.core.state import adapter_layers

from models import ARCHS, build, randomize_adapters, run


def test_an_adapter_named_twice_is_refused_before_anything_changes() -> None:
    # Named twice, the unmerged forward would add the update twice while merging folds it in once.
    model = pk.apply(build("llama"), pk.LoRA(target_modules=ARCHS["llama"].targets, rank=2), name="a")
    pk.apply(model, pk.LoRA(target_modules=["q_proj"], rank=2), name="b")
    randomize_adapters(model)
    with torch.no_grad():
        before = run(model, "llama")
        with pytest.raises(pk.errors.ConfigError, match=r"'a' is named twice in \['a', 'b', 'a'\]"):
            pk.set_adapter(model, ["a", "b", "a"])
        assert pk.active_adapters(model) == ["a"]
        with pytest.raises(pk.errors.ConfigError, match="named twice"):
            pk.merge(model, ("a", "a"))
        assert not any(layer.merged_adapters for _, layer in adapter_layers(model))
        assert torch.equal(run(model, "llama"), before)
