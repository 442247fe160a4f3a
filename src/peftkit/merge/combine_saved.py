"""The ``modules_to_save`` copies of a combined adapter, combined as task vectors of the base module.

Each source adapter i that trains a module in full holds its own copy Mᵢ of it; the frozen original M₀ stays in the
model. The combined adapter gets a copy of its own, M = M₀ + f([M₁ − M₀, …], w) tensor by tensor (weights and
floating-point buffers), where f is the merge function of the combination method on those full deltas:

- ``cat``, ``linear`` / ``task_arithmetic``, ``svd`` / ``task_arithmetic_svd``: task arithmetic,
  M = M₀ + Σᵢ wᵢ·(Mᵢ − M₀), exactly;
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and their ``_svd`` forms: that function (trim, sign
  election, random drop, with the same density, sign rule and seed), as the ``_svd`` forms apply it to the dense ΔWᵢ.

No SVD truncation applies: a full copy is not a low-rank update, so the ``*_svd`` methods keep its deltas whole.
A source that does not train a module takes no part in that module's merge, as in the adapted layers (a zero
delta: the same result, except that it draws no DARE masks). Non-floating buffers (e.g. a batch norm's step count)
are taken from the first source that trains the module. Hugging Face PEFT's ``add_weighted_adapter`` instead gives
the new adapter fresh copies of the base modules, losing what the sources trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import get_state
from peftkit.errors import ConfigError

__all__ = ["check_saved", "combine_saved", "saved_patterns", "write_saved"]


def check_saved(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse sources whose ``modules_to_save`` modules nest (one inside another's): one copy could not hold both.

    Raises:
        ConfigError: two sources train nested modules.
    """
    saved = sorted({q for adapter in names for q in get_state(model).saved.get(adapter, [])})
    for outer in saved:
        inner = [q for q in saved if q.startswith(outer + ".")]
        if inner:
            raise ConfigError(
                f"the adapters train {outer!r} and {inner[0]!r} in full (modules_to_save), one inside the other; "
                "combine adapters that save the same modules"
            )


def saved_patterns(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The sources' ``modules_to_save`` entries, each once, in order: they select the union of their copies."""
    patterns: list[str] = []
    for adapter in names:
        patterns += [p for p in cast(Any, get_state(model).configs[adapter]).modules_to_save if p not in patterns]
    return patterns


def combine_saved(
    model: nn.Module,
    weights: Mapping[str, float],
    fn: Callable[..., torch.Tensor],
    kwargs: Mapping[str, Any],
) -> dict[str, dict[str, torch.Tensor]]:
    """The combined copy's tensors of every module a source trains in full: qualified name → state dict."""
    state = get_state(model)
    modules = dict(model.named_modules())
    combined: dict[str, dict[str, torch.Tensor]] = {}
    for qualname in sorted({q for adapter in weights for q in state.saved.get(adapter, [])}):
        wrapper = cast(ModulesToSave, modules[qualname])
        present = {a: w for a, w in weights.items() if a in wrapper.copies}
        copies = [wrapper.copies[a].state_dict() for a in present]
        out: dict[str, torch.Tensor] = {}
        for key, base in wrapper.base_layer.state_dict().items():
            if not base.is_floating_point():
                out[key] = copies[0][key].clone()
                continue
            deltas = [copy[key].detach() - base for copy in copies]
            out[key] = base + fn(deltas, list(present.values()), **kwargs)
        combined[qualname] = out
    return combined


def write_saved(model: nn.Module, name: str, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy combined tensors into adapter ``name``'s copies (created by ``apply`` from the base modules)."""
    modules = dict(model.named_modules())
    for qualname, values in tensors.items():
        own = cast(ModulesToSave, modules[qualname]).copies[name].state_dict()
        with torch.no_grad():
            for key, value in values.items():
                own[key].copy_(value.to(own[key].dtype))
