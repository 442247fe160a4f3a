"""Sibling projections: LoRA layers that read the very same input tensor run as one group.

Attention computes ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` from one tensor, a gated MLP ``gate_proj(x)``
and ``up_proj(x)``. Each adapter's down-projection reads ``x`` once forward and once backward, and each
projection's input gradient is a separate full-size tensor that autograd then sums. Run as a group (the
idea behind performant LoRA's fused ``linear_qkv``, done at run time on the model as it is):

- forward: one product ``x [A_q; A_k; A_v]ᵀ`` for all the siblings' down-projections, then per sibling
  ``x Wᵢᵀ + bᵢ + sᵢ hᵢ Bᵢᵀ``;
- backward: one ``∂[A_q; A_k; A_v] = [g_q B_q s_q, …]ᵀ x``, and one input-gradient buffer that every term is
  accumulated into (``addmm_``), instead of a gradient per projection and their sum;
- with dropout, one mask per input (what sibling projections share anyway, see
  :mod:`peftkit.methods.lora_dropout`); ``x`` (or ``keep ⊙ x``) is saved once for the group.

The outputs are the same numbers as each layer's own fused forward (:func:`peftkit.methods.lora_kernels.linear_lora`,
:class:`~peftkit.methods.lora_kernels.DoRALinearFn` for DoRA, whose siblings group the same way) up to float
rounding, and the gradients likewise.

How groups form. Nothing about the model is assumed: a layer whose forward takes the fast path records which
layers were called with the same tensor object right before it (the *run*). A run of two or more distinct
layers becomes a group when the next run starts. From then on, the group's first layer (its leader) computes
every sibling's output when it is called, and each sibling, called next with that very tensor (same object,
same version), is handed its output. A call pattern that does not fit — a sibling called with another
tensor, a sibling not called before the leader is called again — disbands the group for good (that leader never
groups again), and every layer computes its own output as before. A call where some member cannot take the fast path
(adapters disabled or switched, autocast) runs every member on its own and keeps the group. The answer is the same
either way; only the speed differs. Under saved-tensor hooks (activation checkpointing) layers never group, nor for
inputs of fewer than :data:`MIN_TOKENS` tokens (decoding), where the bookkeeping would cost more than it saves.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from peftkit.methods.lora_dropout import apply_keep_, dropout_input
from peftkit.methods.lora_kernels import fused_dora_forward, linear_lora, plain_adapter, scaled_rows, widened_inference

__all__ = ["GroupedDoRA", "GroupedLoRA", "enabled", "form_groups", "fused_forward", "group_of"]

#: Switch for grouping (tests turn it off to compare against the per-layer path).
enabled = True

# Saved-tensor hooks (activation checkpointing, offloading) expect a recomputed forward to save exactly what the
# first one saved; a group forming or breaking in between would change that. Under such hooks every layer runs
# on its own and no group forms. Without this (private) query, grouping stays off.
_top_hooks: Any = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


#: Inputs of fewer tokens than this run per layer: grouping saves passes over large activations, while a
#: one-token decoding step is nearly all Python overhead, which the group's bookkeeping would add to.
MIN_TOKENS = 32


def _grouping(x: torch.Tensor) -> bool:
    return (enabled and x.numel() >= MIN_TOKENS * x.shape[-1] and _top_hooks is not None
            and _top_hooks(False) is None)


def _version(x: torch.Tensor) -> int:
    try:
        return int(x._version)
    except RuntimeError:  # inference tensors carry no version counter
        return -1


def _save(ctx: Any, meta: tuple[tuple[int, ...], tuple[float, ...]], *tensors: torch.Tensor | None) -> None:
    """Save a group node's tensors and ``(ranks, scales)``; an unused sibling's gradient arrives as ``None``."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors)
    ctx.meta = meta


def _restore(ctx: Any) -> tuple[tuple[int, ...], tuple[float, ...], int, tuple[Any, ...]]:
    """``(ranks, scales, n, saved tensors)`` of a group node."""
    ranks, scales = ctx.meta
    return ranks, scales, len(ranks), ctx.saved_tensors


def _shared_grads(needs: tuple[bool, ...], ranks: tuple[int, ...], gbs: list[torch.Tensor], inp: torch.Tensor,
                  a_cat: torch.Tensor, keep: torch.Tensor | None, terms: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """What a group's backward computes once for all siblings.

    Args:
        needs: the node's ``needs_input_grad`` (``x`` at 1, the ``Aᵢ`` from 5 on).
        ranks: each sibling's rank; gbs: each sibling's ``sᵢ·(∂yᵢ)Bᵢ`` (tokens × rᵢ, zeros if unused).
        inp: the saved adapter input (``x`` or ``keep ⊙ x``); a_cat: ``[A₁; …; Aₙ]``; keep: the mask or None.
        terms: the base terms ``(G, W)`` of ``∂x = keep⊙(Σ gbᵢ Aᵢ) + Σ G W``, consumed only if ``x`` needs one.

    Returns:
        ``([∂A₁, …, ∂Aₙ], ∂x)``: one ``[gb₁ … gbₙ]ᵀ inp`` product split by rows, and every term of ``∂x``
        accumulated into one buffer (``None`` where not needed).
    """
    n = len(ranks)
    gb = torch.cat(gbs, dim=1) if n > 1 else gbs[0]
    grad_As: list[torch.Tensor | None] = [None] * n
    if any(needs[5:5 + n]):
        grad_a = gb.t() @ inp
        start = 0
        for i, rank in enumerate(ranks):
            grad_As[i] = grad_a[start:start + rank] if needs[5 + i] else None
            start += rank
    grad_x = None
    if needs[1]:
        grad_x = gb @ a_cat
        if keep is not None:
            apply_keep_(grad_x, keep)
        for grad, W in terms:
            grad_x.addmm_(grad, W)
    return grad_As, grad_x


class GroupedLoRA(torch.autograd.Function):
    """``yᵢ = x Wᵢᵀ + bᵢ + sᵢ·(D⊙x) Aᵢᵀ Bᵢᵀ`` for the n siblings of a group, one autograd node.

    Inputs after ``meta = (ranks, scales)`` and ``x``: the keep-mask and ``keep ⊙ x`` (or ``None``), the
    concatenated detached ``[A₁; …; Aₙ]``, then ``A₁…Aₙ``, ``B₁…Bₙ``, ``W₁…Wₙ``, ``b₁…bₙ``. The scales already
    include ``1/(1-p)``. Gradients flow to ``x`` and to each ``Aᵢ``, ``Bᵢ``; ``W`` and ``b`` are frozen.
    """

    @staticmethod
    def forward(ctx: Any, meta: tuple[tuple[int, ...], tuple[float, ...]], x: torch.Tensor,
                keep: torch.Tensor | None, dropped: torch.Tensor | None, a_cat: torch.Tensor,
                *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ranks, scales = meta
        n = len(ranks)
        Bs, Ws, bs = tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        inp = x if keep is None else dropped
        assert inp is not None
        h = F.linear(inp, a_cat)
        outs = []
        start = 0
        for rank, scale, B, W, b in zip(ranks, scales, Bs, Ws, bs, strict=True):
            assert B is not None and W is not None
            out = F.linear(x, W, b)
            outs.append(out.addmm_(h[:, start:start + rank], B.t(), alpha=scale))
            start += rank
        if ctx is not None:
            _save(ctx, meta, inp, keep, h, a_cat, *Bs, *Ws)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ranks, scales, n, (inp, keep, h, a_cat, *rest) = _restore(ctx)
        Bs, Ws = rest[:n], rest[n:]
        need_B = ctx.needs_input_grad[5 + n:5 + 2 * n]
        gbs: list[torch.Tensor] = []
        grad_Bs: list[torch.Tensor | None] = []
        start = 0
        for i, (rank, scale, grad, B) in enumerate(zip(ranks, scales, grads, Bs, strict=True)):
            if grad is None:  # this sibling's output was not used
                gbs.append(h.new_zeros(h.shape[0], rank))
                grad_Bs.append(None)
            else:
                gbs.append((grad @ B).mul_(scale))
                grad_Bs.append(torch.mm(h[:, start:start + rank].t(), grad).t().mul_(scale) if need_B[i] else None)
            start += rank
        terms = ((grad, W) for grad, W in zip(grads, Ws, strict=True) if grad is not None)
        grad_As, grad_x = _shared_grads(ctx.needs_input_grad, ranks, gbs, inp, a_cat, keep, terms)
        return (None, grad_x, None, None, None, *grad_As, *grad_Bs, *([None] * (2 * n)))


class GroupedDoRA(torch.autograd.Function):
    """DoRA for the n siblings of a group, one autograd node (the formula of ``lora_kernels.DoRALinearFn``)::

        yᵢ = gᵢ ⊙ wᵢ + bᵢ,    wᵢ = x Wᵢᵀ + sᵢ·(D⊙x) Aᵢᵀ Bᵢᵀ,    gᵢ = mᵢ / ‖Wᵢ + sᵢBᵢAᵢ‖ (norm detached)

    Inputs after ``meta``, ``x``, the mask, ``keep ⊙ x`` and ``[A₁; …; Aₙ]``: ``A₁…Aₙ``, ``B₁…Bₙ``, the
    magnitudes ``m₁…mₙ``, ``W₁…Wₙ``, ``b₁…bₙ`` and the norms. Gradients flow to ``x``, ``Aᵢ``, ``Bᵢ``, ``mᵢ``.
    """

    @staticmethod
    def forward(ctx: Any, meta: tuple[tuple[int, ...], tuple[float, ...]], x: torch.Tensor,
                keep: torch.Tensor | None, dropped: torch.Tensor | None, a_cat: torch.Tensor,
                *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ranks, scales = meta
        n = len(ranks)
        Bs, Ms, Ws, bs, norms = (tensors[k * n:(k + 1) * n] for k in range(1, 6))
        inp = x if keep is None else dropped
        assert inp is not None
        h = F.linear(inp, a_cat)
        outs, ws, gs = [], [], []
        start = 0
        for rank, scale, B, m, W, b, norm in zip(ranks, scales, Bs, Ms, Ws, bs, norms, strict=True):
            assert B is not None and m is not None and W is not None and norm is not None
            g = m.detach() / norm
            w = F.linear(x, W).addmm_(h[:, start:start + rank], B.t(), alpha=scale)
            start += rank
            if ctx is None:  # inference: w is not needed afterwards
                outs.append(w.mul_(g) if b is None else w.mul_(g).add_(b))
                continue
            outs.append(w * g if b is None else torch.addcmul(b, w, g))
            ws.append(w)
            gs.append(g)
        if ctx is not None:
            _save(ctx, meta, inp, keep, h, a_cat, *Bs, *Ws, *ws, *gs, *norms)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        ranks, scales, n, (inp, keep, h, a_cat, *rest) = _restore(ctx)
        Bs, Ws, ws, gs, norms = (rest[k * n:(k + 1) * n] for k in range(5))
        needs = ctx.needs_input_grad
        gbs: list[torch.Tensor] = []
        grad_Bs: list[torch.Tensor | None] = [None] * n
        grad_Ms: list[torch.Tensor | None] = [None] * n
        start = 0
        for i, (rank, scale, grad) in enumerate(zip(ranks, scales, grads, strict=True)):
            if grad is None:  # this sibling's output was not used
                gbs.append(h.new_zeros(h.shape[0], rank))
            else:
                g = gs[i]
                if needs[5 + 2 * n + i]:
                    grad_Ms[i] = (grad * ws[i]).sum(0).div_(norms[i])
                gbs.append((grad @ (Bs[i] * g[:, None])).mul_(scale))
                if needs[5 + n + i]:
                    grad_Bs[i] = torch.mm(h[:, start:start + rank].t(), grad).t().mul_((g * scale)[:, None])
            start += rank
        terms = (scaled_rows(grad, g, W) for grad, W, g in zip(grads, Ws, gs, strict=True) if grad is not None)
        grad_As, grad_x = _shared_grads(needs, ranks, gbs, inp, a_cat, keep, terms)
        return (None, grad_x, None, None, None, *grad_As, *grad_Bs, *grad_Ms, *([None] * (3 * n)))


class _Group:
    """Sibling layers (weak references, leader first), the adapter they run, and outputs waiting for pickup."""

    __slots__ = ("dora", "members", "name", "p", "pending", "skipped", "source", "version",
                 "__weakref__")

    def __init__(self, members: list[weakref.ref[Any]], name: str, p: float, dora: bool) -> None:
        self.members = members
        self.name, self.p, self.dora = name, p, dora
        self.pending: dict[int, torch.Tensor] = {}
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.skipped = False  # the leader's last call could not run the group (adapters disabled, autocast, …)

    def disband(self) -> None:
        self.pending.clear()
        for ref in self.members:
            layer = ref()
            if layer is not None and _GROUP_OF.get(layer, (None,))[0] is self:
                del _GROUP_OF[layer]
        leader = self.members[0]()
        if leader is not None:
            _NEVER.add(leader)

    @staticmethod
    def concatenated_a(As: list[torch.Tensor]) -> torch.Tensor:
        """``[A₁; …; Aₙ]`` detached, built on every call: a few rank-r rows, cheaper to copy than to prove unchanged
        (fused optimizers write parameters without moving their version counters)."""
        with torch.no_grad():
            return torch.cat([A.detach() for A in As])

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The leader's output, with every sibling's output left pending.

        ``None`` when a member cannot take the fast path for this call (adapters disabled or switched, autocast,
        another dtype): every member then runs on its own for ``x``, and the group stays for later calls.
        """
        self.pending, self.source, self.version, self.skipped = {}, weakref.ref(x), _version(x), True
        plans: list[tuple[Any, ...]] = []
        layers: list[Any] = []
        dora: list[torch.Tensor] = []  # magnitudes, then norms
        for ref in self.members:
            layer: Any = ref()
            layers.append(layer)
            plan = None if layer is None else plain_adapter(layer, x)
            if plan is None or plan[0] != self.name or plan[6] != self.p:
                return None
            if self.dora:
                magnitude = layer._modules["lora_magnitude_vector"]._parameters.get(self.name)
                if magnitude is None:
                    return None
                dora.append(magnitude)
            plans.append(plan)
        if self.dora:
            dora += [layer.weight_norm(self.name) for layer in layers]
        As = [plan[3] for plan in plans]
        p = self.p
        keep = dropped = None
        x2 = x.reshape(-1, x.shape[-1])
        if p > 0:
            keep, dropped = dropout_input(x, p, self.name, None)
        ranks = tuple(A.shape[0] for A in As)
        scales = tuple(plan[5] / (1.0 - p) for plan in plans)
        n = len(As)
        Bs, Ws, bs = [plan[4] for plan in plans], [plan[1] for plan in plans], [plan[2] for plan in plans]
        tensors = (*As, *Bs, *dora[:n], *Ws, *bs, *dora[n:]) if self.dora else (*As, *Bs, *Ws, *bs)
        fn = GroupedDoRA if self.dora else GroupedLoRA
        args = ((ranks, scales), x2, keep, dropped, self.concatenated_a(As), *tensors)
        trained = tensors[:3 * n] if self.dora else tensors[:2 * n]
        outs: tuple[torch.Tensor, ...]
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in trained)):
            outs = fn.apply(*args)  # type: ignore[no-untyped-call]
        else:
            outs = fn.forward(None, *args)
        lead = x.shape[:-1]
        self.pending = {i: out.view(*lead, out.shape[-1]) for i, out in enumerate(outs) if i}
        self.skipped = False
        return outs[0].view(*lead, outs[0].shape[-1])

    def _same_input(self, x: torch.Tensor) -> bool:
        return self.source is not None and self.source() is x and self.version == _version(x)

    def pickup(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s pending output for ``x``, or ``None``."""
        out: torch.Tensor | None = self.pending.pop(index, None)
        return out if out is not None and self._same_input(x) else None

    def skipped_for(self, x: torch.Tensor) -> bool:
        """Whether the leader, called with ``x``, left every member to run on its own."""
        return self.skipped and self._same_input(x)


# Layer → (its group, its index there). Weak keys: copies of a model (deepcopy) and deleted models hold none.
_GROUP_OF: weakref.WeakKeyDictionary[Any, tuple[_Group, int]] = weakref.WeakKeyDictionary()
# Leaders whose group broke: they never group again (a model that alternates patterns stays on the plain path).
_NEVER: weakref.WeakSet[Any] = weakref.WeakSet()


class _Run(threading.local):
    """The layers called in a row with one input tensor (per thread)."""

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.key: tuple[str, float, bool] = ("", 0.0, False)
        self.layers: list[weakref.ref[Any]] = []


_RUN = _Run()


def _finish_run() -> None:
    """Make the current run a group if it has two or more distinct layers, none of them grouped already."""
    layers = [ref() for ref in _RUN.layers]
    _RUN.layers = []
    if len(layers) < 2 or any(layer is None for layer in layers) or len({id(layer) for layer in layers}) < len(layers):
        return
    if layers[0] in _NEVER or any(layer in _GROUP_OF for layer in layers):
        return
    group = _Group([weakref.ref(layer) for layer in layers], *_RUN.key)
    for index, layer in enumerate(layers):
        _GROUP_OF[layer] = (group, index)


def _track(layer: Any, x: torch.Tensor, key: tuple[str, float, bool]) -> None:
    version = _version(x)
    if _RUN.source is not None and _RUN.source() is x and _RUN.version == version and _RUN.key == key:
        _RUN.layers.append(weakref.ref(layer))
        return
    if _RUN.layers:
        _finish_run()
        entry = _GROUP_OF.get(layer)
        if entry is not None:  # the run just closed holds this layer (the model called it again first): its
            group = entry[0]  # group starts with the next call, and the members now follow this call on their own
            group.source, group.version, group.skipped = weakref.ref(x), version, True
    _RUN.source, _RUN.version, _RUN.key, _RUN.layers = weakref.ref(x), version, key, [weakref.ref(layer)]


def form_groups(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Run ``model(*args, **kwargs)`` twice without gradients, the random state put back, so that its sibling
    projections run as groups from the next call on.

    Groups form over a model's first two passes, and grouped and per-layer nodes sum an input's gradient in
    another order (the same numbers up to float rounding). A training loop that calls this with a batch of the
    run before its first step runs the same kernels at every step, so a run resumed from a checkpoint matches
    the uninterrupted run bit for bit (``peftkit train`` does this). The model's training mode decides the key
    groups form under, so call it in the mode you train in.

    Returns:
        ``model``.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for _ in range(2):
            model(*args, **kwargs)
    return model


def group_of(layer: Any) -> list[Any] | None:
    """The layers grouped with ``layer`` (leader first), or ``None`` when it is in no group."""
    entry = _GROUP_OF.get(layer)
    return None if entry is None else [ref() for ref in entry[0].members]


def fused_forward(layer: Any, x: torch.Tensor, dora: bool = False) -> torch.Tensor | None:
    """A ``LoRALinear`` (``DoRALinear``) forward through its group, or on its own in one node; ``None``: use the
    plain path.

    Args:
        layer: a ``LoRALinear``, or a ``DoRALinear`` with ``dora=True``.
        x: its input.
    """
    if torch.compiler.is_compiling():
        return None  # traced by torch.compile: the per-layer path, without groups or cached plans
    grouping = _grouping(x)
    entry = _GROUP_OF.get(layer) if grouping else None
    if entry is not None:
        group, index = entry
        if index:
            out = group.pickup(index, x)
            if out is not None:
                return out
            if not group.skipped_for(x):
                group.disband()  # called with another input, or the leader did not run first
        elif group.pending:
            group.disband()  # a sibling did not pick up its output since the last call
        else:
            out = group.run(x)
            if out is not None:
                return out
    plan = plain_adapter(layer, x)
    if plan is None:
        return None if dora else widened_inference(layer, x)
    name, weight, bias, A, B, scale, p = plan
    if dora and name in layer._modules["lora_magnitude_vector"]._parameters:  # (else a plain LoRA adapter)
        out = fused_dora_forward(layer, x, plan)
        if out is not None and grouping:
            _track(layer, x, (name, p, True))
        return out
    if grouping:
        _track(layer, x, (name, p, False))
    return linear_lora(x, weight, bias, A, B, scale, p, p > 0, name, layer)
