"""Parameter counts, the trainable-parameter line, and ``inspect`` (the dry run of ``apply``)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from peftkit.core.config import AdapterConfig
from peftkit.core.layer import AdapterLayer
from peftkit.core.modules_to_save import ModulesToSave


def _numel(param: torch.Tensor) -> int:
    # Quantized weights count the elements they stand for, not their packed bytes (bitsandbytes' 4-bit
    # parameters keep the original shape in their quantization state).
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(int(d) for d in shape)
    return int(getattr(param, "logical_numel", param.numel()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared (tied) parameters count once. Works on ``meta``."""
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    for module in model.modules():  # quantized layers keep their packed weights as buffers
        extra = getattr(module, "frozen_numel", None)
        if callable(extra):
            total += int(extra())
    return trainable, total


def trainable_parameters_line(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print HF PEFT's line: ``trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622``."""
    print(trainable_parameters_line(model))


@dataclass(frozen=True)
class InspectRow:
    """One module ``apply`` would adapt."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    added_params: int
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class InspectReport:
    rows: list[InspectRow]
    total_params: int

    @property
    def added_params(self) -> int:
        return sum(r.added_params for r in self.rows)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        role_width = max([len(", ".join(r.roles)) for r in self.rows] + [4])
        lines = [
            f"{'module':<{width}}  {'role':<{role_width}}  {'type':<12}  {'weight shape':<16}  {'added params':>12}"
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {', '.join(r.roles):<{role_width}}  {r.layer_type:<12}  {str(r.shape):<16}  "
                f"{r.added_params:>12,d}"
            )
        share = 100 * self.added_params / (self.total_params + self.added_params) if self.total_params else 0.0
        lines.append(
            f"{len(self.rows)} modules adapted, {self.added_params:,d} parameters added "
            f"({share:.4f}% of {self.total_params + self.added_params:,d})"
        )
        return "\n".join(lines)


def inspect(model: nn.Module, config: AdapterConfig) -> InspectReport:
    """What ``pk.apply(model, config)`` would do, without changing ``model``.

    The adapter is applied to a copy of the model built on the ``meta`` device, so this costs no
    memory even for 7B-class shapes.

    Returns:
        An :class:`InspectReport`; ``print`` it for a table.
    """
    from peftkit.core.inject import apply, prepared
    from peftkit.core.state import get_state

    config = config.for_model(model)
    shadow = _meta_copy(model)
    name = "inspect"
    while name in get_state(shadow).configs:
        name += "_"
    _, before = count_parameters(shadow)
    with prepared(shadow, config):  # targets on the model as apply reshapes it (LoRA's layer_replication)
        apply(shadow, config, name=name)
    # As apply resolved them: a classification head among the targets is trained in full instead (modules_to_save).
    targets = get_state(shadow).targets[name] if getattr(config, "inject", None) is None else None
    rows: list[InspectRow] = []
    modules = dict(shadow.named_modules())
    roles = _roles(shadow)
    seen: set[int] = set()  # a factor shared by several layers (performant LoRA's A) counts once
    # The targets, then layers the adapter adds besides them (LoRA's trainable token rows), each once.
    listed, known = list(targets or []), set(targets or [])
    listed += [q for q, m in modules.items() if q not in known and isinstance(m, AdapterLayer)
               and not isinstance(m, ModulesToSave) and m.has_adapter(name)]
    for qualname in listed:
        layer = cast(AdapterLayer, modules[qualname])
        own = [p for p in layer.adapter_parameters(name) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own and qualname not in known:
            continue  # e.g. a tied output layer sharing the embedding's rows
        what, kind, shape = layer.describe(qualname)
        rows.append(InspectRow(what, kind, shape, sum(p.numel() for p in own), roles.get(qualname, ())))
    for saved in get_state(shadow).saved.get(name, []):  # modules_to_save: a trained full copy each
        copy_ = cast(ModulesToSave, modules[saved]).copies[name]
        weight = getattr(copy_, "weight", None)
        rows.append(InspectRow(saved, f"{type(copy_).__name__} (copy)", tuple(weight.shape) if weight is not None
                               else (), sum(p.numel() for p in copy_.parameters())))
    _, after = count_parameters(shadow)
    if not rows:
        rows.append(InspectRow("(virtual tokens / added modules)", type(config).__name__, (), after - before))
    return InspectReport(rows, before)


def _roles(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Module name → the target aliases (Megatron-style role names) that select it on this model."""
    from peftkit.core.matching import ALIASES
    from peftkit.errors import PeftkitError

    found: dict[str, tuple[str, ...]] = {}
    for alias, resolve in ALIASES.items():
        if alias == "all-linear":
            continue
        try:
            names = resolve(model)
        except PeftkitError:  # an architecture without this role
            continue
        for n in names:
            found[n] = (*found.get(n, ()), alias)
    return found


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose tensors live on ``meta`` (structure only, no memory)."""
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
