"""Dropout for the LoRA kernels: cheap keep-masks, applied with a bitwise AND, shared by sibling projections.

HF PEFT draws a float Bernoulli tensor per projection with ``nn.Dropout`` and multiplies by it; on CPU the draw
alone is a sixth of a LoRA training step. Here:

- :func:`keep_mask` draws 15 random bits per element (four elements per 64-bit random word) when that
  represents ``p`` to within 2⁻¹⁰ of its value, else 31/32 bits per element;
- :func:`apply_keep` zeroes dropped elements by AND-ing the float bits with an int8 -1/0 mask (1 byte per
  element to save for backward), faster than ``torch.where`` or ``masked_fill`` on a boolean mask;
- :func:`dropout_input` draws one mask per input tensor and hands the same mask and dropped-out copy to the
  sibling projections that read that very tensor (q, k, v; gate, up), as performant LoRA does with its shared A
  (Megatron's fused ``linear_qkv``). Each projection's mask still has the dropout law; siblings' masks are equal.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_INT32_SPAN = 2**32
_LOW31_SPAN = 2**31
_SPAN15 = 2**15
_LOW15_BITS = 0x7FFF_7FFF_7FFF_7FFF  # clears the top bit of each 16-bit slot of a random 64-bit word
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``shape`` whose entries are independently ``True`` with probability ``1 - p``.

    ``Tensor.random_()`` on int64 fills 63 uniform bits per word (the top bit is 0) from the same generator as
    ``torch.rand`` (so ``torch.manual_seed`` makes masks reproducible). When ``q = round(p·2¹⁵)/2¹⁵`` is within
    ``2⁻¹⁰·p`` of ``p``, each word gives four elements: its 16-bit slots with the top bit cleared are uniform on
    [0, 2¹⁵) and an element is dropped when its slot is below ``p·2¹⁵``, i.e. with probability exactly ``q``.
    Otherwise (small ``p``) each word gives two elements compared at 32 resp. 31 bits (drop probability
    ``round(p·2³²)/2³²`` resp. ``round(p·2³¹)/2³¹``).

    Args:
        shape: the mask's shape.
        p: drop probability in [0, 1).
        device: where to make the mask.
        generator: optional random generator (default: the global one).

    Returns:
        A ``torch.bool`` tensor: ``True`` where the element is kept.
    """
    numel = _numel(shape)
    threshold = round(p * _SPAN15)
    if abs(threshold / _SPAN15 - p) <= p / 1024:
        words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
        slots = words.bitwise_and_(_LOW15_BITS).view(torch.int16)
        return torch.ge(slots, threshold)[:numel].view(shape)
    pairs = (numel + 1) // 2
    words = torch.empty(pairs, dtype=torch.int64, device=device).random_(generator=generator)
    halves = words.view(torch.int32).view(pairs, 2)
    keep = torch.empty(pairs, 2, dtype=torch.bool, device=device)
    torch.ge(halves[:, 0], round(p * _INT32_SPAN) - _LOW31_SPAN, out=keep[:, 0])
    torch.ge(halves[:, 1], round(p * _LOW31_SPAN), out=keep[:, 1])
    return keep.view(-1)[:numel].view(shape)


def _bits(keep: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` viewed as integers of its width, and ``keep`` as int8 -1 (kept: all bits set) or 0 (dropped).

    An int8 mask widens inside the AND itself (-1 sign-extends to all ones), with no full-width mask made.
    """
    if keep.dtype == torch.bool:
        keep = keep.to(torch.int8).neg_()
    return t.view(_INT_OF_SIZE[t.element_size()]), keep


def apply_keep(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with the elements where ``keep`` is false (bool) or 0 (int8 -1/0) set to zero, as a new tensor."""
    bits, mask = _bits(keep, t)
    return torch.bitwise_and(bits, mask).view(t.dtype)


def apply_keep_(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """In place: set the elements of ``t`` where ``keep`` is false (bool) or 0 (int8 -1/0) to zero; returns ``t``."""
    bits, mask = _bits(keep, t)
    bits.bitwise_and_(mask)
    return t


def _version(x: torch.Tensor) -> int:
    try:
        return int(x._version)
    except RuntimeError:  # inference tensors carry no version counter
        return -1


# Per adapter name: the last input that had a mask drawn, its version, p, weak references to the mask and the
# dropped-out copy, and the ids of the layers that used them. Weak references: the cache never keeps an
# activation alive; autograd, which saves both, does for as long as the graph lives.
_SHARED: dict[str, tuple[Any, ...]] = {}


def dropout_input(x: torch.Tensor, p: float, name: str = "", owner: object | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep-mask and dropped-out ``x`` (``keep ⊙ x``, unscaled), as ``(tokens, in)``, for one projection.

    A projection (``owner``) called with the very tensor object a sibling was called with (same version, same
    ``p``) gets the sibling's mask and dropped-out copy instead of new ones; the same owner twice on one input
    draws a new mask, as do calls without an owner.

    Args:
        x: the layer input (any shape).
        p: drop probability in (0, 1).
        name: the adapter's name (each adapter has its own masks).
        owner: the calling layer, or ``None`` to never share.

    Returns:
        ``(keep, dropped)``: the mask as int8 (-1 kept, 0 dropped; 1 byte per element like a bool, and ready for
        :func:`apply_keep`) and ``keep ⊙ x``, both ``x``'s elements as a 2-D ``(tokens, in)`` tensor. They are
        the very objects the kernels save, so the weak references below live exactly as long as the autograd
        graph holds them. ``dropped`` does not require grad.
    """
    if owner is not None:
        hit = _SHARED.get(name)
        if hit is not None and hit[0]() is x and hit[1] == _version(x) and hit[2] == p and id(owner) not in hit[5]:
            keep, dropped = hit[3](), hit[4]()
            if keep is not None and dropped is not None:
                hit[5].add(id(owner))
                return keep, dropped
    x2 = x.detach().reshape(-1, x.shape[-1])
    keep = keep_mask(x2.shape, p, x.device).view(torch.int8).neg_()  # a fresh mask: 1 → -1 in place
    dropped = apply_keep(x2, keep)
    if owner is not None:
        _SHARED[name] = (weakref.ref(x), _version(x), p, weakref.ref(keep), weakref.ref(dropped), {id(owner)})
    return keep, dropped
