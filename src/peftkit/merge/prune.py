"""``prune``: make a LoRA or DoRA adapter smaller, by rank (SVD of ΔW) or by zeroing small factor entries.

Rank pruning: in each module ΔW = s·BA has singular values σ₁ ≥ … ≥ σᵣ. Keep the k largest, with k
the smallest rank whose energy Σᵢ≤ₖ σᵢ² reaches ``energy`` · Σᵢ σᵢ² (or k = ``target_rank``); by
Eckart–Young the result B'A' is the best rank-k approximation, and it keeps exactly that fraction of
ΔW's Frobenius energy. The SVD is taken through thin QRs of B and Aᵀ (B = QᵦRᵦ, Aᵀ = QₐRₐ, then the
r × r core RᵦRₐᵀ), so the out × in ΔW is never formed. The adapter's scale s is kept by setting
α' = s·k (α' = s·√k under rsLoRA) per module, so the saved config stays valid for HF PEFT.

Magnitude pruning zeroes, in each factor, the ``sparsity`` fraction of entries of smallest |·| (or,
without ``sparsity``, all but the largest entries holding ``energy`` of the factor's squared sum); the
rank and the file size stay, the nonzero count drops (for sparse storage or kernels).

A bias on B (``lora_bias``) is no part of ΔW = s·BA: both methods keep it as it is.

On a DoRA adapter both act on its low-rank part ΔV = s·BA (the update of the direction) and keep the
magnitude vector as it is; energies and errors in the report are those of ΔV, and the output drift on
a batch shows the effect on the full DoRA weight m·(W₀ + ΔV)/‖W₀ + ΔV‖.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from peftkit.core.inject import inherit_mode
from peftkit.core.state import adapter_layers, get_state, set_adapter
from peftkit.errors import AdapterNotFoundError, AdapterStateError, ConfigError
from peftkit.merge.combine import as_matrices, factors, like_factors, write_factors
from peftkit.merge.trim import magnitude_based_pruning
from peftkit.methods.dora import DoRA
from peftkit.methods.lora import LoRA
from peftkit.methods.lora_init import check_plain
from peftkit.methods.lora_layers import LoRALayer

__all__ = ["PruneReport", "prune"]


@dataclass
class PruneReport:
    """What ``prune`` did.

    Attributes:
        adapter, method: what was pruned, and how.
        params_before, params_after: the adapter's parameter count (rank pruning) or nonzero count
            (magnitude).
        ranks_before, ranks_after: module → rank.
        energy_kept: module → fraction of ‖ΔW‖²_F kept by the new ΔW (rank pruning: exact, by construction);
            ΔW is the low-rank update s·BA (for DoRA, the update of the direction).
        delta_error: module → ‖ΔW − ΔW'‖_F / ‖ΔW‖_F.
        output_drift: max |y − y'| of the model's output on the given batch with only this adapter
            active (``None`` without a batch); ``relative_drift`` is ‖y − y'‖ / ‖y‖.
    """

    adapter: str
    method: str
    params_before: int = 0
    params_after: int = 0
    ranks_before: dict[str, int] = field(default_factory=dict)
    ranks_after: dict[str, int] = field(default_factory=dict)
    energy_kept: dict[str, float] = field(default_factory=dict)
    delta_error: dict[str, float] = field(default_factory=dict)
    output_drift: float | None = None
    relative_drift: float | None = None

    def __str__(self) -> str:
        what = "nonzero params" if self.method == "magnitude" else "params"
        lines = [
            f"pruned {self.adapter!r} by {self.method}: "
            f"{what} {self.params_before:,d} -> {self.params_after:,d} "
            f"({self.params_after / max(1, self.params_before):.1%})",
            f"  min energy kept {min(self.energy_kept.values(), default=1.0):.4f}, "
            f"max relative delta error {max(self.delta_error.values(), default=0.0):.2e}",
        ]
        if self.method == "rank":
            lines.append(
                f"  ranks {sorted(set(self.ranks_before.values()))} -> "
                f"{sorted(set(self.ranks_after.values()))}"
            )
        if self.output_drift is not None:
            lines.append(
                f"  output drift on the batch: max {self.output_drift:.3e}, "
                f"relative {self.relative_drift:.3e}"
            )
        return "\n".join(lines)


def check_options(method: str, target_rank: int | None, energy: float, sparsity: float | None) -> None:
    """Validate the options of :func:`prune` (also for ``peftkit prune`` before it loads a model).

    Raises:
        ConfigError: an option is invalid or does not apply to ``method``.
    """
    if method not in ("rank", "magnitude"):
        raise ConfigError(
            f"method={method!r} is unknown; use 'rank' (SVD) or 'magnitude' (zero small entries)"
        )
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise ConfigError(
            f"energy={energy!r} is outside (0, 1]: the fraction of squared norm to keep, e.g. 0.99"
        )
    if target_rank is not None and (
        isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1
    ):
        raise ConfigError(f"target_rank={target_rank!r} must be a positive integer")
    if target_rank is not None and method != "rank":
        raise ConfigError(f"target_rank={target_rank} applies to method='rank', not {method!r}")
    if sparsity is not None:
        if method != "magnitude":
            raise ConfigError(f"sparsity={sparsity} applies to method='magnitude', not {method!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
            raise ConfigError(
                f"sparsity={sparsity!r} is outside [0, 1): the fraction of entries zeroed, e.g. 0.5"
            )


def _rank_from_energy(S: torch.Tensor, energy: float) -> int:
    power = S.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    # Smallest k with cumulative[k-1] ≥ energy (a tiny tolerance absorbs rounding at energy = 1).
    return int((cumulative < energy - 1e-12).sum().item()) + 1


def _low_rank_svd(A2: torch.Tensor, B2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of B2 @ A2 from the factors: (U, S, Vh) with r columns, never forming the product."""
    Qb, Rb = torch.linalg.qr(B2)
    Qa, Ra = torch.linalg.qr(A2.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    return Qb @ U, S, Vh @ Qa.T


def _prune_rank(
    layer: LoRALayer, name: str, target_rank: int | None, energy: float
) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
    A, B = factors(layer, name)
    A2, B2 = as_matrices(A.detach(), B.detach())
    work = torch.promote_types(A2.dtype, torch.float32)
    U, S, Vh = _low_rank_svd(A2.to(work), B2.to(work))
    k = min(target_rank, len(S)) if target_rank is not None else _rank_from_energy(S, energy)
    root = S[:k].sqrt()
    return k, like_factors(root[:, None] * Vh[:k], U[:, :k] * root, A, B)


def _prune_magnitude(tensor: torch.Tensor, energy: float, sparsity: float | None) -> torch.Tensor:
    if sparsity is not None:
        return magnitude_based_pruning(tensor, 1.0 - sparsity) if sparsity > 0 else tensor.clone()
    power = tensor.double().flatten() ** 2
    ordered = power.sort(descending=True).values
    total = float(ordered.sum())
    if total == 0.0:
        return tensor.clone()
    keep = int((torch.cumsum(ordered, 0) / total < energy - 1e-12).sum().item()) + 1
    return magnitude_based_pruning(tensor, keep / tensor.numel())


def _low_rank_delta(layer: LoRALayer, name: str) -> torch.Tensor:
    """s·BA as a 2-D matrix: the LoRA update (for DoRA, the update of the direction, without the magnitude)."""
    A2, B2 = as_matrices(*factors(layer, name))
    return (B2.detach() @ A2.detach()) * layer.scaling[name]


def _forward(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    out = getattr(out, "logits", out)
    if isinstance(out, tuple | list):
        out = out[0]
    return cast(torch.Tensor, out).detach().float()


def _with_only(model: nn.Module, name: str, batch: Any) -> torch.Tensor:
    """The model's output on ``batch`` with only ``name`` active, in eval mode; all state restored."""
    state = get_state(model)
    previous, training = list(state.active), model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        set_adapter(model, [name])
        model.eval()
        with torch.no_grad():
            return _forward(model, batch)
    finally:
        set_adapter(model, previous)
        model.train(training)
        for param, flag in flags:
            param.requires_grad_(flag)


def prune(
    model: nn.Module,
    name: str,
    method: str = "rank",
    target_rank: int | None = None,
    energy: float = 0.99,
    sparsity: float | None = None,
    batch: Any = None,
) -> PruneReport:
    """Shrink LoRA or DoRA adapter ``name`` in place (see the module doc) and report what changed.

    Args:
        model: a model holding LoRA or DoRA adapter ``name`` (not merged); a DoRA magnitude is kept.
        name: the adapter to prune.
        method: ``"rank"`` (truncated SVD of each ΔW) or ``"magnitude"`` (zero small factor entries).
        target_rank: with ``"rank"``, the rank to keep in every module (modules already smaller keep theirs);
            overrides ``energy``.
        energy: the fraction in (0, 1] of squared Frobenius norm to keep per module (of ΔW for ``"rank"``,
            of each factor for ``"magnitude"`` without ``sparsity``).
        sparsity: with ``"magnitude"``, the fraction in [0, 1) of each factor's entries to zero.
        batch: optional model input (a tensor, or a dict of keyword arguments) to measure output drift on.

    Returns:
        A :class:`PruneReport`.

    Raises:
        AdapterNotFoundError: no adapter ``name``. AdapterStateError: it is merged.
        ConfigError: an out-of-range option, or an adapter that is neither LoRA nor DoRA.
    """
    check_options(method, target_rank, energy, sparsity)
    state = get_state(model)
    if name not in state.configs:
        raise AdapterNotFoundError(
            f"no adapter named {name!r} on this model; its adapters are {sorted(state.configs) or 'none'}"
        )
    config = state.configs[name]
    if not isinstance(config, LoRA) or type(config) not in (LoRA, DoRA):
        raise ConfigError(f"adapter {name!r} is {type(config).__name__}; prune supports LoRA and DoRA adapters")
    if config.target_parameters:
        raise ConfigError(
            f"adapter {name!r} adapts parameters ({config.target_parameters[:2]}…: one packed LoRA per expert), "
            "which prune does not reduce; prune adapters of modules only"
        )
    check_plain(model, name, "pk.prune")
    # The low-rank layers: trainable-token rows (LoRA's trainable_token_indices) are kept as they are.
    layers = [(q, layer) for q, layer in adapter_layers(model)
              if isinstance(layer, LoRALayer) and layer.has_adapter(name)]
    merged = [q for q, layer in layers if name in layer.merged_adapters]
    if merged:
        raise AdapterStateError(
            f"adapter {name!r} is merged at {merged[:3]}; call pk.unmerge(model) before pruning"
        )
    before = _with_only(model, name, batch) if batch is not None else None
    report = PruneReport(adapter=name, method=method)
    for qualname, layer in layers:
        old = _low_rank_delta(layer, name)
        report.ranks_before[qualname] = layer.rank[name]
        if method == "rank":
            _apply_rank(report, qualname, layer, name, config, target_rank, energy)
        else:
            A, B = factors(layer, name)
            report.params_before += int(A.count_nonzero()) + int(B.count_nonzero())
            write_factors(
                layer,
                name,
                _prune_magnitude(A.detach(), energy, sparsity),
                _prune_magnitude(B.detach(), energy, sparsity),
            )
            A, B = factors(layer, name)
            report.params_after += int(A.count_nonzero()) + int(B.count_nonzero())
        report.ranks_after[qualname] = layer.rank[name]
        new = _low_rank_delta(layer, name)
        norm = float(old.double().norm())
        report.energy_kept[qualname] = float(new.double().norm()) ** 2 / norm**2 if norm else 1.0
        report.delta_error[qualname] = float((old - new).double().norm()) / norm if norm else 0.0
    if method == "rank":
        _update_config(model, name, config, report.ranks_after, layers)
    if before is not None:
        after = _with_only(model, name, batch)
        report.output_drift = float((after - before).abs().max())
        report.relative_drift = float((after - before).norm() / before.norm().clamp_min(1e-30))
    return report


def _apply_rank(
    report: PruneReport,
    qualname: str,
    layer: LoRALayer,
    name: str,
    config: LoRA,
    target_rank: int | None,
    energy: float,
) -> None:
    A, B = factors(layer, name)
    report.params_before += A.numel() + B.numel()
    k, (new_A, new_B) = _prune_rank(layer, name, target_rank, energy)
    if k < layer.rank[name]:
        _resize(layer, name, k, config.use_rslora)
        write_factors(layer, name, new_A, new_B)
    A, B = factors(layer, name)
    report.params_after += A.numel() + B.numel()


def _resize(layer: LoRALayer, name: str, rank: int, use_rslora: bool) -> None:
    """Re-create adapter ``name`` of ``layer`` at ``rank`` with the same scale, dropout, trainability, DoRA
    magnitude and bias on B (``lora_bias``)."""
    scale = layer.scaling[name]
    alpha = scale * (math.sqrt(rank) if use_rslora else rank)
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    position = layer.dropout_position[name]
    trainable = any(param.requires_grad for param in layer.adapter_parameters(name))
    active = list(layer.active_adapters)
    magnitudes = getattr(layer, "lora_magnitude_vector", None)
    magnitude = magnitudes[name].detach().clone() if magnitudes is not None and name in magnitudes else None
    bias = layer.up_bias(name)
    bias = None if bias is None else bias.detach().clone()
    layer.delete_adapter(name)
    existing = {id(m) for m in layer.modules()}
    with torch.random.fork_rng(devices=[]):  # the new factors are overwritten: leave the global RNG alone
        cast(Any, layer).add(name, rank, alpha, dropout=p, use_rslora=use_rslora, dropout_position=position,
                             lora_bias=bias is not None)
    inherit_mode(layer, existing)  # the new modules evaluate in an evaluating model
    layer.scaling[name] = scale  # exactly the old value, not recomputed through rounding
    if bias is not None:  # the bias does not depend on the rank: kept as it was
        with torch.no_grad():
            cast(torch.Tensor, layer.up_bias(name)).copy_(bias)
    if magnitude is not None:  # add() makes no magnitude: DoRA's is put back unchanged
        cast(Any, layer).lora_magnitude_vector[name] = nn.Parameter(magnitude)
    layer.active_adapters = [n for n in active if layer.has_adapter(n)]
    for param in layer.adapter_parameters(name):
        param.requires_grad_(trainable)


def _update_config(
    model: nn.Module, name: str, config: LoRA, ranks: Mapping[str, int], layers: list[tuple[str, Any]]
) -> None:
    """Record the new per-module ranks and alphas, so that save_adapter writes a loadable config."""
    alphas = {}
    for qualname, layer in layers:
        rank = layer.rank[name]
        alphas[qualname] = layer.scaling[name] * (math.sqrt(rank) if config.use_rslora else rank)
    order = sorted(ranks, key=lambda q: -q.count("."))
    get_state(model).configs[name] = config.replace(
        rank_pattern={q: ranks[q] for q in order} if len(set(ranks.values())) > 1 else {},
        alpha_pattern={q: alphas[q] for q in order} if len(set(alphas.values())) > 1 else {},
        rank=max(ranks.values()) if len(set(ranks.values())) > 1 else next(iter(ranks.values())),
        alpha=alphas[max(ranks, key=lambda q: ranks[q])],
    )
