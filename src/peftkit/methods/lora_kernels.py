"""Fast paths for LoRA: one autograd function per adapter update, and cheap dropout masks.

The update added to the base layer's output is (Hu et al., 2021, https://arxiv.org/abs/2106.09685)::

    y = base(x) + s · (D ⊙ x) Aᵀ Bᵀ,      D = keep-mask / (1 - p)  (D = 1 without dropout)

Autograd over ``B(A(dropout(x))) * s`` (what HF PEFT runs) saves the dropped-out input as a full float tensor
for every projection, draws its mask with ``nn.Dropout`` (a float Bernoulli per element, slow on CPU) and runs
separate kernels for the scale and the sum. :class:`LoRAUpdate` instead (the recipe Unsloth uses):

- saves ``x`` itself without dropout, which projections reading the same input (q, k, v; gate, up) share;
  with dropout it saves ``keep ⊙ x`` and the 1-byte mask, both drawn once per input tensor and shared by the
  projections reading it (:mod:`peftkit.methods.lora_dropout`), so the base term never needs ``x`` again;
- folds the scale and the sum into one ``addmm`` each way, with ``1/(1-p)`` folded into the scale;
- draws the keep-mask from raw 64-bit random words (:func:`keep_mask`), several times faster than a float
  Bernoulli, and applies it with an integer AND.

The gradients are those of the formula above: ``∂B = s·gᵀh``, ``∂A = s·(gB)ᵀ(D⊙x)``, ``∂x = s·D⊙(gB)A``,
with ``h = (D⊙x)Aᵀ`` saved (it is only r wide). The straightforward path in ``LoRALinear.forward`` stays for
everything this does not cover (``dropout_position="post"``, mixed dtypes, a bias on B); tests in ``tests/perf``
check both agree.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from peftkit.core.epoch import EPOCH, STEPS
from peftkit.methods.lora_dropout import apply_keep, apply_keep_, dropout_input, keep_mask

__all__ = ["DoRALinearFn", "LoRAUpdate", "fused_dora_forward", "keep_mask", "linear_lora",
           "lora_update", "plain_adapter", "scaled_rows", "supports", "widened_inference"]


class LoRAUpdate(torch.autograd.Function):
    """``base + s·(D⊙x)AᵀBᵀ`` on 2-D inputs, saving the adapter's input, the mask and the r-wide ``h``.

    ``base`` is either a given output tensor (any base layer, ``weight=None``) or, for a plain frozen linear
    layer, ``x Wᵀ + b`` computed here so that backward can accumulate ``∂x`` into one buffer (``addmm_``)
    instead of autograd summing two full-size gradients. ``dropped`` is ``keep ⊙ x`` when the caller already
    has it (shared by sibling projections); it is computed here otherwise.
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor | None, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scale: float, keep: torch.Tensor | None, p: float, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, dropped: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            inp, s = x, scale
        else:
            inp, s = (apply_keep(x, keep) if dropped is None else dropped), scale / (1.0 - p)
        h = torch.nn.functional.linear(inp, A)
        ctx.save_for_backward(inp, keep, h, A, B, weight)  # inp is x, or keep⊙x (x itself is not needed then)
        ctx.scale = s
        if result is None:
            assert weight is not None  # linear_lora passes the base weight instead of a result
            out = torch.nn.functional.linear(x, weight, bias)
            return out.addmm_(h, B.t(), alpha=s)
        return torch.addmm(result, h, B.t(), alpha=s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inp, keep, h, A, B, weight = ctx.saved_tensors
        s: float = ctx.scale
        need_result, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = None
        if need_x or need_A:
            gb = (grad @ B).mul_(s)  # (tokens, r): scaling here is r wide, not in or out wide
            if need_A:
                grad_A = gb.t() @ inp
            if need_x:
                if keep is None:
                    grad_x = gb @ A if weight is None else torch.mm(grad, weight).addmm_(gb, A)
                else:
                    grad_x = apply_keep_(gb @ A, keep)
                    if weight is not None:
                        grad_x = grad_x.addmm_(grad, weight)
        if need_B:
            grad_B = torch.mm(h.t(), grad).t().mul_(s)  # (hᵀg)ᵀ: the faster orientation for a skinny product
        return grad if need_result else None, grad_x, grad_A, grad_B, None, None, None, None, None, None


def _dropout(x: torch.Tensor, p: float, training: bool, name: str, owner: object | None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(keep, keep⊙x)`` as 2-D ``(tokens, in)`` views, or ``(None, None)`` without dropout."""
    if not (training and p > 0):
        return None, None
    return dropout_input(x, p, name, owner)  # keyed on the caller's x: siblings are called with the same object


def lora_update(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                p: float = 0.0, training: bool = False, name: str = "", owner: object | None = None
                ) -> torch.Tensor:
    """``result + scale · B A dropout(x)`` for a linear LoRA adapter, with HF PEFT's input-dropout semantics.

    Args:
        result: the base layer's output, shape ``(..., out)``.
        x: the layer input, shape ``(..., in)``, same dtype as ``A``.
        A: the down-projection weight ``(r, in)``; B: the up-projection weight ``(out, r)``.
        scale: the LoRA scale ``s``.
        p: dropout probability on the adapter input (applied only when ``training``).
        training: whether dropout is active.
        name, owner: the adapter's name and the calling layer; layers called with the very same ``x`` share
            one dropout mask (see :func:`~peftkit.methods.lora_dropout.dropout_input`). No owner: a new mask.

    Returns:
        The updated output, shape and dtype of ``result``.
    """
    out_shape = result.shape
    x2 = x.reshape(-1, x.shape[-1])
    r2 = result.reshape(-1, out_shape[-1])
    keep, dropped = _dropout(x, p, training, name, owner)
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or result.requires_grad):
        updated: torch.Tensor = LoRAUpdate.apply(r2, x2, A, B, scale, keep, p, None, None,  # type: ignore[no-untyped-call]
                                                 dropped)
        return updated.view(out_shape)
    s = scale if keep is None else scale / (1.0 - p)
    return torch.addmm(r2, torch.nn.functional.linear(x2 if dropped is None else dropped, A), B.t(),
                       alpha=s).view(out_shape)


def linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scale: float, p: float = 0.0, training: bool = False, name: str = "",
                owner: object | None = None) -> torch.Tensor:
    """``x Wᵀ + b + scale · B A dropout(x)`` for a frozen ``nn.Linear`` and one adapter, in one autograd node.

    Args:
        x: the layer input ``(..., in)``; weight, bias: the frozen base layer's tensors.
        A, B, scale, p, training, name, owner: as for :func:`lora_update`.

    Returns:
        The layer output ``(..., out)``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() and not (training and p > 0):
        # Inference: as few kernel launches as possible (decoding one token is all overhead). On 2-D inputs
        # F.linear is one BLAS call; on 3-D ones it goes through matmul's reshapes.
        result = torch.nn.functional.linear(x2, weight, bias)
        result.addmm_(torch.nn.functional.linear(x2, A), B.t(), alpha=scale)
        return result.view(*x.shape[:-1], weight.shape[0])
    keep, dropped = _dropout(x, p, training, name, owner)
    out: torch.Tensor = LoRAUpdate.apply(None, x2, A, B, scale, keep, p, weight, bias,  # type: ignore[no-untyped-call]
                                         dropped)
    return out.view(*x.shape[:-1], weight.shape[0])


# Whether autocast is on for any device (88 ns, against 400 for ``torch.is_autocast_enabled(x.device.type)``).
_any_autocast: Any = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")))


def _structure(layer: Any) -> tuple[Any, ...] | None:
    """``(name, base, A, B, s, dropout)`` when ``layer`` runs one adapter on an ``nn.Linear``, else ``None``
    (``base``, ``A``, ``B``: the modules' parameter dicts).

    Not disabled; exactly one active adapter, not merged, with a plain ``nn.Linear`` A (a shared grouped
    down-projection computes A itself), a plain ``nn.Linear`` B without a bias (``lora_bias``: the kernels here
    compute ``s·BA`` only) and dropout (``nn.Dropout`` or none, ``dropout`` is then ``None``) before A; the base an
    ``nn.Linear``.
    Only what :mod:`peftkit.core.epoch` tracks, so the answer is cached. Sibling groups
    (:mod:`peftkit.methods.lora_groups`) are formed and run only from layers with a plan: a layer without one
    never joins a group.
    """
    if layer.disabled:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.merged_adapters or layer.dropout_position.get(name) != "pre":
        return None
    modules = layer._modules
    down = modules["lora_A"]._modules.get(name)
    base = modules["base_layer"]
    if type(down) is not torch.nn.Linear or type(base) is not torch.nn.Linear:
        return None
    up = modules["lora_B"]._modules[name]
    if type(up) is not torch.nn.Linear or up._parameters.get("bias") is not None:
        return None  # an activated LoRA's B (lora_activated) masks its output itself
    drop = modules["lora_dropout"]._modules[name]
    if type(drop) is torch.nn.Identity:
        drop = None
    elif type(drop) is not torch.nn.Dropout:  # a dropout module of the user's: only the plain path calls it
        return None
    # The modules' parameter dicts, not the tensors: offloading hooks (accelerate) swap entries in them.
    return (name, base._parameters, down._parameters, up._parameters, layer.scaling[name], drop)


def _cached_structure(layer: Any) -> tuple[Any, ...] | None:
    """:func:`_structure`, cached on the layer until :data:`peftkit.core.epoch.EPOCH` moves."""
    cached = layer.__dict__.get("_plan")
    if cached is None or cached[0] != EPOCH.value:
        cached = (EPOCH.value, _structure(layer))
        layer.__dict__["_plan"] = cached  # not through nn.Module.__setattr__: a plain cache, not module state
    return cast(tuple[Any, ...] | None, cached[1])


#: Adapter dtype → the narrower input dtypes :func:`widened_inference` serves (fp32 adapters on a half-precision
#: model, HF PEFT's default there).
_WIDER = {torch.float32: (torch.bfloat16, torch.float16)}


def widened_inference(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """Inference of one adapter in a wider dtype than its frozen ``nn.Linear`` (fp32 factors on a bf16 model), in HF
    PEFT's order: the update computed in the adapter's dtype and added to the widened base output, the sum rounded
    once. ``None`` where it does not apply (gradients on, dropout active, autocast, other structures, one dtype).

    The same few kernels as the straightforward path, with one cached plan instead of its checks and module calls:
    one-token decoding on a GPU is bound by them.
    """
    if torch.is_grad_enabled():
        return None
    plan = _cached_structure(layer)
    if plan is None:
        return None
    _, base, down, up, scale, drop = plan
    weight, bias, A = base["weight"], base["bias"], down["weight"]
    if (x.dtype is not weight.dtype or x.dtype not in _WIDER.get(A.dtype, ()) or (drop is not None and drop.training)
            or _any_autocast()):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(torch.nn.functional.linear(x2, weight, bias).to(A.dtype),
                      torch.nn.functional.linear(x2.to(A.dtype), A), up["weight"].t(), alpha=scale)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def plain_adapter(layer: Any, x: torch.Tensor) -> tuple[Any, ...] | None:
    """``(name, W, b, A, B, s, p)`` when ``layer``'s forward is one adapter on a frozen ``nn.Linear``, else None.

    The structure (which adapter, which tensors, which dropout: :func:`_structure`) is cached on the layer
    until :data:`peftkit.core.epoch.EPOCH` moves; the rest is checked on every call: the base weight and bias
    frozen, ``x`` in the adapter's and the base's dtype, no autocast, dropout's ``p`` if it is training.
    Decoding one token is nearly all such overhead: re-deriving the structure on every call (a dozen
    dictionary lookups on cold objects) cost as much as the adapter's two small matmuls.
    """
    plan = _cached_structure(layer)
    if plan is None:
        return None
    name, base, down, up, scale, drop = plan
    weight, bias, A = base["weight"], base["bias"], down["weight"]
    if (weight.requires_grad or (bias is not None and bias.requires_grad) or x.dtype is not A.dtype
            or weight.dtype is not A.dtype or _any_autocast()):
        return None  # (an input of the wrong width fails in F.linear with the same error as the base layer's)
    return name, weight, bias, A, up["weight"], scale, (drop.p if drop is not None and drop.training else 0.0)


def supports(x: torch.Tensor, A: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether :func:`lora_update` applies: a floating input in the adapter's dtype and a matching output.

    Not under autocast, which changes the dtypes of the matmuls behind the kernels' backs.
    """
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.dtype == A.dtype == result.dtype and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] == A.shape[1]


def scaled_rows(grad: torch.Tensor, g: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of ``(g⊙G) W = G (g⊙W)``, with ``g`` applied to whichever of ``G`` (tokens × out) and
    ``W`` (out × in) is smaller: one pass over fewer numbers."""
    if weight.numel() <= grad.numel():
        return grad, weight * g[:, None]
    return grad * g, weight


class DoRALinearFn(torch.autograd.Function):
    """DoRA on a frozen ``nn.Linear`` (Liu et al., 2024, https://arxiv.org/abs/2402.09353), one autograd node.

    With ``g = m/‖W + sBA‖`` (norm detached), the adapter's dropped-out input ``d = keep⊙x`` and
    ``c = 1/(1-p)`` (dropout on the adapter branch only, see :mod:`peftkit.methods.dora`)::

        y = g⊙w + b,        w = Wx + c·s·BAd

    Without dropout ``d = x`` and this is HF PEFT's formula exactly. One base matmul either way.
    Backward, with ``G = ∂y`` and ``Ĝ = g⊙G``: ``∂m = Σₜ G⊙w / ‖·‖``; ``∂x = ĜW + c·s·keep⊙(ĜB)A``;
    ``∂A = c·s·(ĜB)ᵀd``; ``∂B = c·s·Ĝᵀh``. ``Ĝ`` is never formed: ``ĜB = G(g⊙B)``, ``Ĝᵀh = g⊙(Gᵀh)`` and
    ``ĜW`` scales whichever of ``G`` and ``W`` is smaller. Saved: ``x`` (or ``d`` with dropout, plus the mask),
    ``h = dAᵀ`` (r wide) and ``w`` (out wide; ``∂m`` needs it).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, magnitude: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor, scale: float,
                keep: torch.Tensor | None, p: float, dropped: torch.Tensor | None = None) -> torch.Tensor:
        g = magnitude / norm
        if keep is None:
            inp, s = x, scale
        else:
            inp, s = (apply_keep(x, keep) if dropped is None else dropped), scale / (1.0 - p)
        h = torch.nn.functional.linear(inp, A)
        w = torch.nn.functional.linear(x, weight).addmm_(h, B.t(), alpha=s)
        if ctx is None:  # called directly without autograd (inference): w is not needed afterwards
            return w.mul_(g) if bias is None else w.mul_(g).add_(bias)
        ctx.save_for_backward(inp, keep, h, w, g, norm, A, B, weight)
        ctx.scale = s
        return w * g if bias is None else torch.addcmul(bias, w, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inp, keep, h, w, g, norm, A, B, weight = ctx.saved_tensors
        s: float = ctx.scale
        need_x, need_m, need_A, need_B = ctx.needs_input_grad[:4]
        grad_x = grad_m = grad_A = grad_B = None
        if need_m:
            grad_m = (grad * w).sum(0).div_(norm)
        gb = (grad @ (B * g[:, None])).mul_(s)  # (tokens, r) = s·(g⊙G)B, with g on B's rows instead of G
        if need_A:
            grad_A = gb.t() @ inp
        if need_B:
            grad_B = torch.mm(h.t(), grad).t().mul_((g * s)[:, None])
        if need_x:
            grad_x = gb @ A
            if keep is not None:
                apply_keep_(grad_x, keep)
            grad_x.addmm_(*scaled_rows(grad, g, weight))
        return grad_x, grad_m, grad_A, grad_B, None, None, None, None, None, None, None


def fused_dora_forward(layer: Any, x: torch.Tensor, plan: tuple[Any, ...] | None = None) -> torch.Tensor | None:
    """A ``DoRALinear`` forward in one node for one DoRA adapter on a frozen ``nn.Linear``, else ``None``.

    Args:
        layer: a ``DoRALinear`` (needs ``lora_magnitude_vector`` and ``weight_norm(name)``).
        x: the layer input.
        plan: ``plain_adapter(layer, x)`` when the caller has it already.
    """
    plan = plan or plain_adapter(layer, x)
    if plan is None:
        return None
    name, weight, bias, A, B, scale, p = plan
    magnitude = layer._modules["lora_magnitude_vector"]._parameters.get(name)
    if magnitude is None:
        return None
    if p == 0.0 and not torch.is_grad_enabled():  # inference: g = m/‖·‖ cached while nothing changes
        # Spelled out: a generator over the four tensors costs more than the lookups themselves (decoding one
        # token is mostly such overhead); the layer's own cache key (every base tensor, through nn.Module) 5 µs.
        key = (EPOCH.value, STEPS.value, A.data_ptr(), A._version, B.data_ptr(), B._version, magnitude.data_ptr(),
               magnitude._version, weight.data_ptr(), weight._version)
        hit = layer.__dict__.get("_factor")
        if hit is not None and hit[0] == key:
            g = hit[1]
        else:
            g = layer.inference_factor(name, magnitude)
            layer.__dict__["_factor"] = (key, g)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.nn.functional.linear(x2, weight).addmm_(torch.nn.functional.linear(x2, A), B.t(), alpha=scale)
        y = y.mul_(g) if bias is None else y.mul_(g).add_(bias)
        return y.view(*x.shape[:-1], weight.shape[0])
    keep, dropped = _dropout(x, p, p > 0, name, layer)
    args = (x.reshape(-1, x.shape[-1]), magnitude, A, B, weight, bias, layer.weight_norm(name), scale, keep, p,
            dropped)
    if torch.is_grad_enabled():
        out: torch.Tensor = DoRALinearFn.apply(*args)  # type: ignore[no-untyped-call]
    else:
        out = DoRALinearFn.forward(None, *args)
    return out.view(*x.shape[:-1], weight.shape[0])
