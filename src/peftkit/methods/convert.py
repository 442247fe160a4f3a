"""Exact conversion between performant and canonical LoRA, on a live model or at save time.

Performant → canonical copies the shared A into every part and splits B by the part's rows (the tied-weight
proof of seed 000)::

    [B_q B_k B_v] A x  =  [B_q (A x)  B_k (A x)  B_v (A x)]

Canonical → performant stacks the parts' A and makes B block-diagonal, so the rank becomes k·r for k parts::

    A' = [A_q; A_k; A_v],   B'_q = [B_q 0 0],  B'_k = [0 B_k 0],  B'_v = [0 0 B_v]   ⇒   B'_p A' = B_p A_p

with α adjusted so that the scale is unchanged: α' = k·α for s = α/r, α' = √k·α with rsLoRA (s = α/√r).
When the parts' A are identical (an adapter converted from performant form) they are tied back instead and
the rank stays r, so converting there and back is the identity.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.inject import apply, delete_adapter
from peftkit.core.layer import AdapterLayer
from peftkit.core.modules_to_save import ModulesToSave
from peftkit.core.state import get_state, set_adapter
from peftkit.errors import AdapterNotFoundError, AdapterStateError, CheckpointError, ConfigError
from peftkit.methods.canonical import CanonicalLoRA, CanonicalLoRALinear
from peftkit.methods.grouped import role_groups
from peftkit.methods.lora import LoRA
from peftkit.methods.lora_init import check_plain
from peftkit.methods.lora_layers import LoRALinear
from peftkit.methods.roles import GROUP_ROLES, fused_layout
from peftkit.methods.trainable_tokens import TrainableTokensLayer

LAYOUTS = ("canonical", "performant")
Tensors = dict[str, dict[str, torch.Tensor]]  # qualified module name → its adapter tensors (HF local keys)


def _common(config: LoRA) -> dict[str, Any]:
    return {
        "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
        "dropout_position": config.dropout_position, "use_rslora": config.use_rslora, "init_A": config.init_A,
        "init_B": config.init_B, "bias": config.bias, "lora_bias": config.lora_bias,
        "modules_to_save": list(config.modules_to_save), "trainable_token_indices": config.trainable_token_indices,
        "task_type": config.task_type, "layer_replication": config.layer_replication, "extra": dict(config.extra),
    }


def stack_parts(As: list[torch.Tensor], Bs: list[torch.Tensor], alpha: float,
                use_rslora: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """One A over k parts and each part's B against it, with the α that keeps the scale: ``(A, Bs, α')``."""
    if all(torch.equal(As[0], a) for a in As[1:]):
        return As[0], Bs, alpha
    k, r = len(As), As[0].shape[0]
    wide = []
    for i, B in enumerate(Bs):
        block = B.new_zeros(B.shape[0], k * r)
        block[:, i * r:(i + 1) * r] = B
        wide.append(block)
    return torch.cat(As), wide, alpha * (math.sqrt(k) if use_rslora else k)


def _out(layer: nn.Module) -> int:
    return cast(int, layer.out_features)


def _to_canonical(model: nn.Module, config: LoRA, targets: list[str], tensors: Tensors) -> tuple[LoRA, Tensors]:
    modules = dict(model.named_modules())
    out: Tensors = {}
    for name, local in tensors.items():
        layer = modules[name]
        layout = fused_layout(model, name, _out(layer)) if type(layer) is LoRALinear else None
        if layout is None:
            out[name] = local
            continue
        A, B = local["lora_A.weight"], local["lora_B.weight"]
        out[name] = {}
        for part, rows in layout.items():
            out[name][f"lora_A.{part}.weight"] = A.clone()
            out[name][f"lora_B.{part}.weight"] = B[rows.to(B.device)].clone()
    new = CanonicalLoRA(
        **_common(config), target_modules=targets,
        rank_pattern={t: config.rank_for(t) for t in targets if config.rank_for(t) != config.rank},
        alpha_pattern={t: config.alpha_for(t) for t in targets if config.alpha_for(t) != config.alpha},
    )
    return new, out


def _to_performant(model: nn.Module, config: CanonicalLoRA, targets: list[str],
                   tensors: Tensors) -> tuple[LoRA, Tensors]:
    ranks = {t: config.rank_for(t) for t in targets}
    alphas = {t: config.alpha_for(t) for t in targets}
    out: Tensors = dict(tensors)
    modules = dict(model.named_modules())
    for name in targets:
        layer, local = modules[name], tensors[name]
        if not (isinstance(layer, CanonicalLoRALinear) and layer.is_canonical_adapter(local)):
            continue
        layout = layer.layout
        parts = [p for p in layout if f"lora_A.{p}.weight" in local]
        As = [local[f"lora_A.{p}.weight"] for p in parts]
        Bs = [local[f"lora_B.{p}.weight"] for p in parts]
        A, wide, alphas[name] = stack_parts(As, Bs, alphas[name], config.use_rslora)
        B = A.new_zeros(_out(modules[name]), A.shape[0])
        for part, block in zip(parts, wide, strict=True):
            B[layout[part].to(B.device)] = block
        out[name] = {"lora_A.weight": A, "lora_B.weight": B}
        ranks[name] = A.shape[0]
    groups = []
    for group in role_groups(model, list(GROUP_ROLES), targets):
        if len({ranks[n] for n in group}) > 1 or len({alphas[n] for n in group}) > 1:
            continue  # parts with different ranks or scales stay separate adapters (still exact)
        As = [out[n]["lora_A.weight"] for n in group]
        Bs = [out[n]["lora_B.weight"] for n in group]
        A, wide, alpha = stack_parts(As, Bs, alphas[group[0]], config.use_rslora)
        for n, B in zip(group, wide, strict=True):
            out[n] = {"lora_A.weight": A.clone(), "lora_B.weight": B}
            ranks[n], alphas[n] = A.shape[0], alpha
        groups.append(group)
    new = LoRA(
        **_common(config), target_modules=targets, shared_A=groups,
        rank_pattern={t: r for t, r in ranks.items() if r != config.rank},
        alpha_pattern={t: a for t, a in alphas.items() if a != config.alpha},
    )
    return new, out


def converted(model: nn.Module, name: str, to: str) -> tuple[LoRA, Tensors]:
    """Adapter ``name`` of ``model`` in layout ``to``: its new config and its tensors per module (copies).

    Raises:
        ConfigError: ``to`` is not a layout, the adapter is not LoRA / CanonicalLoRA, or it has ``lora_bias`` and
            ``to`` is ``"canonical"``.
        AdapterNotFoundError: no adapter ``name``.
    """
    if to not in LAYOUTS:
        raise ConfigError(f"layout {to!r} is not one of {LAYOUTS}")
    state = get_state(model)
    if name not in state.configs:
        raise AdapterNotFoundError(
            f"no adapter named {name!r} on this model; its adapters are {sorted(state.configs)}"
        )
    config = state.configs[name]
    if not isinstance(config, LoRA) or type(config) not in (LoRA, CanonicalLoRA):  # exactly these, no subclass
        raise ConfigError(
            f"adapter {name!r} is {type(config).__name__}; only LoRA and CanonicalLoRA adapters convert between "
            "performant and canonical layouts"
        )
    if config.target_parameters:
        raise ConfigError(
            f"adapter {name!r} adapts parameters ({config.target_parameters[:2]}…), which have no performant or "
            "canonical layout; save it as it is (layout=None)"
        )
    check_plain(model, name, "converting between layouts")
    if to == "canonical" and config.lora_bias:
        raise ConfigError(
            f"adapter {name!r} has lora_bias=True (a trained bias on B), which CanonicalLoRA does not support; "
            "keep it in the performant layout (pk.LoRA)"
        )
    modules = dict(model.named_modules())
    targets = [t for t in state.targets[name] if not _is_saved_copy(modules[t])]
    tensors = {t: {k: v.detach().clone() for k, v in modules[t].adapter_tensors(name).items()}
               for t in state.targets[name] if isinstance(modules[t], AdapterLayer)}
    for qualname, module in modules.items():  # modules_to_save copies, trainable_token_indices rows: unchanged
        if (isinstance(module, (TrainableTokensLayer, ModulesToSave)) and qualname not in tensors
                and module.has_adapter(name) and module.adapter_tensors(name)):
            tensors[qualname] = {k: v.detach().clone() for k, v in module.adapter_tensors(name).items()}
    if isinstance(config, CanonicalLoRA):
        return (config, tensors) if to == "canonical" else _to_performant(model, config, targets, tensors)
    return _to_canonical(model, config, targets, tensors) if to == "canonical" else (config, tensors)


def _is_saved_copy(module: nn.Module) -> bool:
    return isinstance(module, ModulesToSave)


def convert(model: nn.Module, to: str, name: str | None = None) -> nn.Module:
    """Convert LoRA adapters in place between performant and canonical layouts; outputs are unchanged.

    The adapter gets new parameter objects: build the optimizer after converting.

    Args:
        model: a model with LoRA or CanonicalLoRA adapters.
        to: ``"canonical"`` (an A and B per logical part) or ``"performant"`` (one A per fused group).
        name: the adapter to convert (default: every adapter).

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: an unknown layout, a method other than LoRA/CanonicalLoRA, or ``lora_bias`` with
            ``to="canonical"`` (checked for every adapter before any is converted).
        AdapterStateError: an adapter of the model is merged (checked before any is converted).
    """
    state = get_state(model)
    names = list(state.configs) if name is None else [name]
    changes = [(n, c, t) for n, (c, t) in [(n, converted(model, n, to)) for n in names] if c is not state.configs[n]]
    # Converting re-adds the adapter, which a model with any merged adapter refuses: check before removing any.
    merged = sorted({f"{q} ({', '.join(m.merged_adapters)})" for q, m in model.named_modules()
                     if isinstance(m, AdapterLayer) and m.merged_adapters})
    if changes and merged:
        raise AdapterStateError(
            f"the model has merged adapters at {merged[:3]}{' …' if len(merged) > 3 else ''}; "
            "call pk.unmerge(model) before pk.convert"
        )
    for n, new_config, tensors in changes:
        _replace(model, n, new_config, tensors)
    return model


def _replace(model: nn.Module, name: str, config: LoRA, tensors: Tensors) -> None:
    state = get_state(model)
    active = list(state.active)
    params = [p for t in tensors for p in model.get_submodule(t).adapter_parameters(name)]  # type: ignore[operator]
    trainable = any(p.requires_grad for p in params)
    delete_adapter(model, name)
    apply(model, config, name=name, activate=False)
    for qualname, local in tensors.items():
        layer = model.get_submodule(qualname)
        own = layer.adapter_tensors(name)  # type: ignore[operator]
        if set(own) != set(local):
            raise CheckpointError(f"{qualname}: converted tensors {sorted(local)} do not fit {sorted(own)}")
        layer.load_adapter_state_dict(name, local, where=f"{qualname}.")  # type: ignore[operator]
    if active:
        set_adapter(model, active)
    if not trainable:
        for qualname in tensors:
            for p in model.get_submodule(qualname).adapter_parameters(name):  # type: ignore[operator]
                p.requires_grad_(False)


def export_adapter(model: nn.Module, name: str, layout: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Adapter ``name`` in ``layout`` as ``(adapter_config.json dict, tensors under HF PEFT keys)``.

    The model is unchanged.
    """
    from peftkit.io.hf_format import PREFIX, adapter_config_dict

    config, tensors = converted(model, name, layout)
    if isinstance(config, CanonicalLoRA):
        targets = [t for t in get_state(model).targets[name] if not _is_saved_copy(model.get_submodule(t))]
        config._plan = config.plan(model, targets)
    state = {f"{PREFIX}{t}.{k}": v for t, local in tensors.items() for k, v in local.items()}
    extra = getattr(config, "extra_tensors", None)
    if extra is not None:
        state.update(extra(model, name))
    return adapter_config_dict(model, name, config=config), state
