"""Performant LoRA on separate projections: one shared A for a group of sibling layers.

Megatron Core fuses q, k and v (and gate and up) into one linear layer, so its performant LoRA has one
adapter over the fused output (seed 000). On a model with separate ``q_proj``/``k_proj``/``v_proj`` the same
adapter is a shared down-projection A with each projection keeping its own rows of B::

    [q k v] = [W_q W_k W_v] x + [B_q B_k B_v] A dropout(x)

The three wrappers stay ordinary :class:`~peftkit.methods.lora_layers.LoRALinear` layers whose ``lora_A``
entry is one :class:`SharedDown` module. It computes ``A(dropout(x))`` once per input tensor (the siblings are
called with the very same ``x``), hands the result to the others and drops it once they have used it: one
matmul and one dropout mask instead of three. On disk each projection's ``lora_A.weight`` holds a copy of A,
which is exactly Hugging Face PEFT's LoRA on q_proj, k_proj and v_proj with tied A.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.roles import ARCHITECTURES, GROUP_ROLES, PART_OF_ROLE, fused_layout, model_type, role_modules

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA
    from peftkit.methods.lora_layers import LoRALinear


def _version(x: torch.Tensor) -> int:
    try:
        return int(x._version)
    except RuntimeError:  # inference tensors carry no version counter
        return -1


class SharedDown(nn.Module):
    """``A(dropout(x))``, computed once per input for ``consumers`` sibling layers.

    Attributes:
        weight: A, shape (rank, in_features); the same parameter for every sibling.
        dropout: the group's one dropout (identity when ``dropout_position`` is ``"post"``).
        consumers: how many siblings read each result.
    """

    def __init__(self, weight: nn.Parameter, dropout: nn.Module, consumers: int) -> None:
        super().__init__()
        self.weight = weight
        self.dropout = dropout
        self.consumers = consumers
        # (input, (its version, grad mode, training), result, siblings yet to read it)
        self._cache: tuple[torch.Tensor, tuple[int, bool, bool], torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (_version(x), torch.is_grad_enabled(), self.training)
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == key:
            left = cache[3] - 1
            self._cache = (x, key, cache[2], left) if left > 0 else None
            return cache[2]
        out = F.linear(self.dropout(x), self.weight)
        # Keep the result only until the other siblings have read it.
        self._cache = (x, key, out, self.consumers - 1) if self.consumers > 1 else None
        return out

    def clear(self) -> None:
        """Forget a result not yet read by every sibling."""
        self._cache = None

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle never carry a cached activation
        getstate = cast(Callable[[], dict[str, Any]], super().__getstate__)  # untyped in torch
        state = dict(getstate())
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"rank={self.weight.shape[0]}, in_features={self.weight.shape[1]}, consumers={self.consumers}"


def role_groups(model: nn.Module, roles: list[str], targets: list[str]) -> list[list[str]]:
    """Groups of separate sibling projections among ``targets`` that the group ``roles`` stand for.

    A group is the targets of one group role (``linear_qkv``, ``linear_fc1``) inside one parent module, in
    part order (q, k, v / gate, up), when there are at least two of them. Fused projections form no group.
    """
    if model_type(model) not in ARCHITECTURES:
        return []
    chosen = set(targets)
    groups: list[list[str]] = []
    for role in roles:
        if role not in GROUP_ROLES:
            continue
        order: dict[str, int] = {}
        for rank, part in enumerate(GROUP_ROLES[role]):
            for name in role_modules(model, part) if part in ARCHITECTURES[model_type(model) or ""].roles else []:
                order.setdefault(name, rank)
        by_parent: dict[str, list[str]] = {}
        for name in role_modules(model, role):
            if name in chosen and fused_layout(model, name) is None:
                by_parent.setdefault(name.rpartition(".")[0], []).append(name)
        for members in by_parent.values():
            if len(members) > 1:
                groups.append(sorted(members, key=lambda n: (order.get(n, len(order)), n)))
    return groups


def plan_groups(config: LoRA, model: nn.Module, targets: list[str]) -> list[list[str]]:
    """The groups ``config`` shares A across on ``model``: its explicit ``shared_A`` plus its group roles.

    Raises:
        ConfigError: a part role (``linear_q``) on a fused projection (that needs ``CanonicalLoRA``), or a group
            whose members have different ranks or input sizes.
    """
    roles = [t for t in config.target_modules if t in PART_OF_ROLE or t in GROUP_ROLES]
    for role in roles if not getattr(config, "adapts_parts", False) else []:
        if role in PART_OF_ROLE:
            fused = [n for n in role_modules(model, role) if n in targets and fused_layout(model, n) is not None]
            if fused:
                raise ConfigError(
                    f"{type(config).__name__} target {role!r} is one part of the fused projection {fused[0]}; "
                    "performant LoRA adapts a fused projection as a whole. Use 'linear_qkv'/'linear_fc1', or "
                    f"pk.CanonicalLoRA(target_modules=[{role!r}, ...]) for an adapter per part."
                )
    if not getattr(config, "shares_A", False):
        return []
    chosen = set(targets)
    groups = [[n for n in g if n in chosen] for g in config.shared_A]
    groups = [g for g in groups if len(g) > 1]
    taken = {n for g in groups for n in g}
    groups += [g for g in role_groups(model, roles, targets) if not taken & set(g)]
    modules = dict(model.named_modules())
    for group in groups:
        ranks = {config.rank_for(n) for n in group}
        fan_in = {getattr(modules[n], "in_features", None) for n in group}
        if len(ranks) > 1 or len(fan_in) > 1:
            raise ConfigError(
                f"the projections {group} share one LoRA A, so they need the same rank and input size; got ranks "
                f"{sorted(ranks)} (check rank_pattern) and input sizes {sorted(map(str, fan_in))}"
            )
    return groups


def share_down_projections(model: nn.Module, name: str, groups: list[list[str]]) -> None:
    """Make each group's layers use one :class:`SharedDown` for adapter ``name`` (the first member's A)."""
    for group in groups:
        layers = [cast("LoRALinear", model.get_submodule(n)) for n in group]
        first = layers[0]
        pre = first.dropout_position[name] == "pre"
        dropout = first.lora_dropout[name] if pre else nn.Identity()
        shared = SharedDown(cast(nn.Parameter, first.lora_A[name].weight), dropout, len(layers))
        for layer in layers:
            layer.lora_A[name] = shared
            if pre:
                layer.lora_dropout[name] = nn.Identity()


def groups_of(model: nn.Module, name: str) -> list[list[str]]:
    """The groups of layers sharing adapter ``name``'s A on ``model`` (exact qualified names)."""
    by_module: dict[int, list[str]] = {}
    for qualname, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and name in lora_a and isinstance(lora_a[name], SharedDown):
            by_module.setdefault(id(lora_a[name]), []).append(qualname)
    return list(by_module.values())
