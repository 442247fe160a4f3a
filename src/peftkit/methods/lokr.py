"""LoKr: a Kronecker product as the weight update.

Papers: Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
ICLR 2024 (https://arxiv.org/abs/2309.14859); its CP form from FedPara (https://arxiv.org/abs/2108.06098).

A frozen weight W₀ of out × in (× kernel) is split as out = a·b and in = c·d by :func:`factorization`, and::

    ΔW = (W1 ⊗ W2) · α/r        W1: a × c      W2: b × d (× kernel)

W2 is a full matrix when the rank is at least half its larger side (``lokr_w2``), else the low-rank product
``W2a W2b`` (``lokr_w2_a``, ``lokr_w2_b``), or with ``use_effective_conv2d`` on a convolution with a kernel larger
than 1 a CP form ``einsum(T2, W2a, W2b)`` (``lokr_t2``). W1 is full (``lokr_w1``) unless ``decompose_both`` and the
rank is below half its larger side (``lokr_w1_a``, ``lokr_w1_b``). The scale is α/r in every case, also when both
factors are full and r is not used. Tensor names, shapes and the rules above are Hugging Face PEFT's; so is the
initialisation: W1 (or W1a) zero and the others Kaiming-uniform, so ΔW starts at zero (``init_weights="lycoris"``:
W2 (or W2b) zero instead; ``False``: all random).

On a Conv1d with a full W2 (b × d × k), HF PEFT's ``torch.kron`` of the 2-D W1 with the 3-D W2 pads W1 to
(1, a, c) and gives a (b, a·d, c·k) tensor that is then reshaped to (out, in, k): not the Kronecker structure of
the other cases, but what its files mean, so peftkit computes the same. With ``use_effective_conv2d`` on a Conv1d,
HF PEFT 0.21.2 fails in ``torch.kron`` (a stride error); peftkit computes what its code means there,
(W1 ⊗ T-form W2) with the kernel as for a Conv2d. Forward, dropout and merging: see
:mod:`peftkit.methods.lycoris`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.registry import register_method
from peftkit.errors import ConfigError
from peftkit.methods.lycoris import LycorisConfig, LycorisLayer, cp_weight, kaiming


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m·n = dimension``, as LyCORIS and HF PEFT do.

    A positive ``factor`` that divides ``dimension`` is taken as ``m`` (so ``m > n`` is possible:
    ``factorization(128, 32) == (32, 4)``). Otherwise ``m`` steps through the divisors of ``dimension`` while
    ``m < n`` and ``m`` stays at most ``factor`` (-1: no bound, which ends near the square root), and the pair is
    returned smaller first: ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


class LoKrLayer(LycorisLayer):
    """LoKr adapters on an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    method = "LoKr"
    adapter_containers: ClassVar[tuple[str, ...]] = (
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lokr_w1 = nn.ParameterDict()
        self.lokr_w1_a = nn.ParameterDict()
        self.lokr_w1_b = nn.ParameterDict()
        self.lokr_w2 = nn.ParameterDict()
        self.lokr_w2_a = nn.ParameterDict()
        self.lokr_w2_b = nn.ParameterDict()
        self.lokr_t2 = nn.ParameterDict()

    def add(self, name: str, rank: int, alpha: float, *, rank_dropout: float = 0.0, module_dropout: float = 0.0,
            effective_conv: bool = False, init_weights: bool | str = True, decompose_both: bool = False,
            decompose_factor: int = -1, rank_dropout_scale: bool = False) -> None:
        factory: dict[str, Any] = self._factory()
        a, b = factorization(self.out_features, decompose_factor)
        c, d = factorization(self.in_features, decompose_factor)
        new: dict[str, tuple[int, ...]] = {}  # container → shape; W1's then W2's, the order of initialisation

        if decompose_both and rank < max(a, c) / 2:
            new.update({"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)})
        else:
            new["lokr_w1"] = (a, c)
        if rank >= max(b, d) / 2:
            new["lokr_w2"] = (b, d, *self.kernel)
        elif self.takes_cp(effective_conv):
            new.update({"lokr_w2_a": (rank, b), "lokr_w2_b": (rank, d), "lokr_t2": (rank, rank, *self.cp_kernel)})
        else:
            new.update({"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(self.kernel))})
        for container, shape in new.items():
            getattr(self, container)[name] = nn.Parameter(torch.empty(shape, **factory))

        # HF PEFT's initialisations, in its order (a seeded model starts from HF PEFT's values).
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[init_weights]
        order = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]
        if init_weights == "lycoris":  # HF PEFT zeroes W2b before drawing W2a
            order[4:6] = ["lokr_w2_b", "lokr_w2_a"]
        with torch.no_grad():
            for container in (c for c in order if c in new):
                tensor = getattr(self, container)[name]
                nn.init.zeros_(tensor) if container in zero else kaiming(tensor)
        self._add_common(name, rank, alpha, rank_dropout, module_dropout, rank_dropout_scale)

    def _product(self, name: str) -> torch.Tensor:
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = cp_weight(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return kron(w1, w2)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """W1 (a × c) ⊗ W2 (b × d × kernel…) → (a·b, c·d, kernel…): W1 carries no kernel, as in HF PEFT.

    A 3-D W2 (a Conv1d's full ``lokr_w2``) goes through ``torch.kron`` as in HF PEFT, which pads W1 to (1, a, c).
    Otherwise the product is written out: ``torch.kron`` of HF PEFT's unsqueezed (a, c, 1, 1) W1 fails with a stride
    error for some shapes (a CP Conv1d's (b, d, k, 1) W2), where it means this.
    """
    if w2.dim() == 3:
        return torch.kron(w1, w2)
    (a, c), (b, d), kernel = w1.shape, w2.shape[:2], w2.shape[2:]
    product = w1.reshape(a, 1, c, 1, *[1] * len(kernel)) * w2.reshape(1, b, 1, d, *kernel)
    return product.reshape(a * b, c * d, *kernel)


@register_method
@dataclass
class LoKr(LycorisConfig):
    """LoKr: ``W₀x + (W1 ⊗ W2)·(α/r) x`` on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (HF PEFT's
    ``LoKrConfig``).

    Attributes (besides those of :class:`peftkit.methods.lycoris.LycorisConfig`):
        decompose_both: factor W1 as W1a W1b too, where the rank is below half its larger side.
        decompose_factor: the size :func:`factorization` aims ``out = a·b`` and ``in = c·d`` at: -1 splits near
            the square root; a positive divisor is taken as ``a`` (and ``c``) exactly.
        rank_dropout_scale: divide the rank-dropout mask by its mean (LoHa always does).
        init_weights: ``True`` (W1 zero), ``"lycoris"`` (W2 zero, as the LyCORIS repository) or ``False``.
    """

    peft_type = "LOKR"
    layer_class = LoKrLayer
    init_choices = (True, False, "lycoris")
    own_hf_fields = ("decompose_both", "decompose_factor", "rank_dropout_scale")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor < 1):
            raise ConfigError(f"decompose_factor={factor!r} must be -1 (split near the square root) or a positive "
                              "integer (e.g. 4)")

    def layer_options(self, qualname: str) -> dict[str, Any]:
        return {**super().layer_options(qualname), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor, "rank_dropout_scale": self.rank_dropout_scale}

    def hf_fields(self) -> dict[str, Any]:
        return {"decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor,
                "rank_dropout_scale": self.rank_dropout_scale}

    @classmethod
    def options_from_hf(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"decompose_both": bool(data.get("decompose_both", False)),
                "decompose_factor": data.get("decompose_factor", -1),
                "rank_dropout_scale": bool(data.get("rank_dropout_scale", False))}
