"""Fast paths for LoRA: one autograd function per adapter update, and cheap dropout masks.

The update added to the base layer's output is (Hu et al., 2021, https://arxiv.org/abs/2106.09685)::

    y = base(x) + s · (D ⊙ x) Aᵀ Bᵀ,      D = keep-mask / (1 - p)  (D = 1 without dropout)

Autograd over ``B(A(dropout(x))) * s`` (what HF PEFT runs) saves the dropped-out input as a full float tensor
for every projection, draws its mask with ``nn.Dropout`` (a float Bernoulli per element, slow on CPU) and runs
separate kernels for the scale and the sum. :class:`LoRAUpdate` instead (the recipe Unsloth uses):

- saves ``x`` itself, which projections reading the same input (q, k, v; gate, up) share, plus a 1-byte mask
  per projection, and recomputes ``D ⊙ x`` in backward;
- folds the scale and the sum into one ``addmm`` each way, with ``1/(1-p)`` folded into the scale;
- draws the keep-mask from raw 64-bit random words (:func:`keep_mask`), several times faster than a float
  Bernoulli, with the same distribution up to 2⁻³¹.

The gradients are those of the formula above: ``∂B = s·gᵀh``, ``∂A = s·(gB)ᵀ(D⊙x)``, ``∂x = s·D⊙(gB)A``,
with ``h = (D⊙x)Aᵀ`` saved (it is only r wide). The straightforward path in ``LoRALinear.forward`` stays for
everything this does not cover (``dropout_position="post"``, mixed dtypes); tests in ``tests/perf`` check
both agree.
"""

from __future__ import annotations

from typing import Any

import torch

_INT32_SPAN = 2**32
_LOW31_SPAN = 2**31


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``shape`` whose entries are independently ``True`` with probability ``1 - p``.

    ``Tensor.random_()`` on int64 fills 63 uniform bits per word (the top bit is 0) from the same generator as
    ``torch.rand`` (so ``torch.manual_seed`` makes masks reproducible). Viewed as int32, even positions are
    uniform over all 2³² values and odd positions over the 2³¹ non-negative ones, so each half is compared
    with its own threshold. The drop probability is ``round(p·2³²)/2³²`` resp. ``round(p·2³¹)/2³¹``.

    Args:
        shape: the mask's shape.
        p: drop probability in [0, 1).
        device: where to make the mask.
        generator: optional random generator (default: the global one).

    Returns:
        A ``torch.bool`` tensor: ``True`` where the element is kept.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    pairs = (numel + 1) // 2
    words = torch.empty(pairs, dtype=torch.int64, device=device).random_(generator=generator)
    halves = words.view(torch.int32).view(pairs, 2)
    keep = torch.empty(pairs, 2, dtype=torch.bool, device=device)
    torch.ge(halves[:, 0], round(p * _INT32_SPAN) - _LOW31_SPAN, out=keep[:, 0])
    torch.ge(halves[:, 1], round(p * _LOW31_SPAN), out=keep[:, 1])
    return keep.view(-1)[:numel].view(shape)


class LoRAUpdate(torch.autograd.Function):
    """``base + s·(D⊙x)AᵀBᵀ`` on 2-D inputs, saving ``x``, the mask and the r-wide ``h`` for backward.

    ``base`` is either a given output tensor (any base layer, ``weight=None``) or, for a plain frozen linear
    layer, ``x Wᵀ + b`` computed here so that backward can accumulate ``∂x`` into one buffer (``addmm_``)
    instead of autograd summing two full-size gradients.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor | None, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, keep: torch.Tensor | None, p: float, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        dropped = x if keep is None else torch.where(keep, x, 0.0)  # no bool→float conversion pass
        s = scale if keep is None else scale / (1.0 - p)
        h = torch.nn.functional.linear(dropped, A)
        ctx.save_for_backward(x, keep, h, A, B, weight)
        ctx.scale = s
        if result is None:
            assert weight is not None  # linear_lora passes the base weight instead of a result
            out = torch.nn.functional.linear(x, weight, bias)
            return out.addmm_(h, B.t(), alpha=s)
        return torch.addmm(result, h, B.t(), alpha=s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, h, A, B, weight = ctx.saved_tensors
        s: float = ctx.scale
        need_result, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = None
        if need_x or need_A:
            gb = (grad @ B).mul_(s)  # (tokens, r): scaling here is r wide, not in or out wide
            if need_A:
                grad_A = gb.t() @ (x if keep is None else torch.where(keep, x, 0.0))
            if need_x:
                if weight is not None and keep is None:
                    grad_x = torch.mm(grad, weight).addmm_(gb, A)
                else:
                    grad_x = gb @ A
                    if keep is not None:
                        grad_x = torch.where(keep, grad_x, 0.0)
                    if weight is not None:
                        grad_x = grad_x.addmm_(grad, weight)
        if need_B:
            grad_B = (grad.t() @ h).mul_(s)
        return grad if need_result else None, grad_x, grad_A, grad_B, None, None, None, None, None


def lora_update(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``result + scale · B A dropout(x)`` for a linear LoRA adapter, with HF PEFT's input-dropout semantics.

    Args:
        result: the base layer's output, shape ``(..., out)``.
        x: the layer input, shape ``(..., in)``, same dtype as ``A``.
        A: the down-projection weight ``(r, in)``; B: the up-projection weight ``(out, r)``.
        scale: the LoRA scale ``s``.
        p: dropout probability on the adapter input (applied only when ``training``).
        training: whether dropout is active.

    Returns:
        The updated output, shape and dtype of ``result``.
    """
    out_shape = result.shape
    x2 = x.reshape(-1, x.shape[-1])
    r2 = result.reshape(-1, out_shape[-1])
    keep = keep_mask(x2.shape, p, x2.device) if training and p > 0 else None
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or result.requires_grad):
        updated: torch.Tensor = LoRAUpdate.apply(r2, x2, A, B, scale, keep, p)  # type: ignore[no-untyped-call]
        return updated.view(out_shape)
    dropped = x2 if keep is None else torch.where(keep, x2, 0.0)
    s = scale if keep is None else scale / (1.0 - p)
    return torch.addmm(r2, torch.nn.functional.linear(dropped, A), B.t(), alpha=s).view(out_shape)


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scale: float, p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``x Wᵀ + b + scale · B A dropout(x)`` for a frozen ``nn.Linear`` and one adapter, in one autograd node.

    Args:
        x: the layer input ``(..., in)``; weight, bias: the frozen base layer's tensors.
        A, B, scale, p, training: as for :func:`lora_update`.

    Returns:
        The layer output ``(..., out)``.
    """
    if not torch.is_grad_enabled() and not (training and p > 0):
        # Inference: as few kernel launches as possible (decoding one token is all overhead).
        out = torch.nn.functional.linear(x, weight, bias)
        h = torch.nn.functional.linear(x, A)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.t(), alpha=scale)
        return out
    x2 = x.reshape(-1, x.shape[-1])
    keep = keep_mask(x2.shape, p, x2.device) if training and p > 0 else None
    out: torch.Tensor = LoRAUpdate.apply(None, x2, A, B, scale, keep, p, weight, bias)  # type: ignore[no-untyped-call]
    return out.view(*x.shape[:-1], weight.shape[0])


def fused_forward(layer: Any, x: torch.Tensor, applied: list[str]) -> torch.Tensor | None:
    """The whole ``LoRALinear`` forward in one node when it is one adapter on a frozen ``nn.Linear``, else None."""
    base = layer.base_layer
    if len(applied) != 1 or type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    name = applied[0]
    if type(layer.lora_A[name]) is not torch.nn.Linear:  # a shared (grouped) down-projection computes A itself
        return None
    A = layer.lora_A[name].weight
    if layer.dropout_position[name] != "pre" or not supports(x, A, base.weight):
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    return linear_lora(x, base.weight, base.bias, A, layer.lora_B[name].weight, layer.scaling[name], p,
                       drop.training)


def supports(x: torch.Tensor, A: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether :func:`lora_update` applies: a floating input in the adapter's dtype and a matching output.

    Not under autocast, which changes the dtypes of the matmuls behind the kernels' backs.
    """
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.dtype == A.dtype == result.dtype and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == A.shape[1]


class DoRALinearFn(torch.autograd.Function):
    """DoRA on a frozen ``nn.Linear`` (Liu et al., 2024, https://arxiv.org/abs/2402.09353), one autograd node.

    With ``g = m/‖W + sBA‖`` (norm detached), dropped-out input ``d = x⊙keep`` and ``c = 1/(1-p)``::

        y = Wx + b + (g−1)⊙(c·Wd) + g⊙(c·s·BAd)          (HF PEFT's formula)
          = Wx + b + g⊙w − c·Wd,        w = c·(Wd + s·BAd)

    Without dropout ``d = x`` and this is ``g⊙(Wx + s·BAx) + b``: one base matmul and no separate base term.
    Backward: ``∂m = Σₜ G⊙w / ‖·‖``; ``∂x = GW + c·keep⊙(((g−1)⊙G)W + s(g⊙G)BᵀA)``; ``∂A``, ``∂B`` from ``g⊙G``.
    Saved: ``x``, the mask, ``h = dAᵀ`` (r wide) and ``w`` (out wide; ``m`` needs it).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, magnitude: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor, scale: float,
                keep: torch.Tensor | None, p: float) -> torch.Tensor:
        g = magnitude / norm
        if keep is None:
            h = torch.nn.functional.linear(x, A)
            w = torch.nn.functional.linear(x, weight).addmm_(h, B.t(), alpha=scale)
            if ctx is None:  # inference: w is not needed afterwards, scale it in place
                out = w.mul_(g) if bias is None else w.mul_(g).add_(bias)
            else:
                out = w * g if bias is None else torch.addcmul(bias, w, g)
            c = 1.0
        else:
            c = 1.0 / (1.0 - p)
            dropped = torch.where(keep, x, 0.0)
            h = torch.nn.functional.linear(dropped, A)
            wd = torch.nn.functional.linear(dropped, weight)
            w = torch.addmm(wd, h, B.t(), alpha=scale).mul_(c)
            out = torch.nn.functional.linear(x, weight, bias).addcmul_(w, g).sub_(wd, alpha=c)
        if ctx is not None:  # None when called directly without autograd (inference)
            ctx.save_for_backward(x, keep, h, w, g, norm, A, B, weight)
            ctx.scale, ctx.c = scale, c
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, keep, h, w, g, norm, A, B, weight = ctx.saved_tensors
        s, c = ctx.scale, ctx.c
        need_x, need_m, need_A, need_B = ctx.needs_input_grad[:4]
        gg = grad * g
        grad_x = grad_m = grad_A = grad_B = None
        if need_m:
            grad_m = (grad * w).sum(0) / norm
        gb = (gg @ B).mul_(s * c)  # (tokens, r)
        if need_A:
            grad_A = gb.t() @ (x if keep is None else torch.where(keep, x, 0.0))
        if need_B:
            grad_B = (gg.t() @ h).mul_(s * c)
        if need_x:
            if keep is None:
                grad_x = torch.mm(gg, weight).addmm_(gb, A)
            else:
                inner = torch.mm(grad * (g - 1), weight).mul_(c).addmm_(gb, A)
                grad_x = torch.where(keep, inner, 0.0).addmm_(grad, weight)
        return grad_x, grad_m, grad_A, grad_B, None, None, None, None, None, None


def fused_dora_forward(layer: Any, x: torch.Tensor, applied: list[str]) -> torch.Tensor | None:
    """A ``DoRALinear`` forward in one node for one DoRA adapter on a frozen ``nn.Linear``, else ``None``.

    Args:
        layer: a ``DoRALinear`` (needs ``lora_magnitude_vector`` and ``weight_norm(name)``).
        x: the layer input; applied: the adapters its forward must add.
    """
    base = layer.base_layer
    if len(applied) != 1 or type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    name = applied[0]
    if name not in layer.lora_magnitude_vector or type(layer.lora_A[name]) is not torch.nn.Linear:
        return None
    A = layer.lora_A[name].weight
    if not supports(x, A, base.weight) or (base.bias is not None and base.bias.requires_grad):
        return None
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    keep = keep_mask(x2.shape, p, x2.device) if p > 0 else None
    args = (x2, layer.lora_magnitude_vector[name], A, layer.lora_B[name].weight, base.weight, base.bias,
            layer.weight_norm(name), layer.scaling[name], keep, p)
    if torch.is_grad_enabled():
        out: torch.Tensor = DoRALinearFn.apply(*args)  # type: ignore[no-untyped-call]
    else:
        out = DoRALinearFn.forward(None, *args)
    return out.view(*x.shape[:-1], base.weight.shape[0])
