"""LoHa: a low-rank Hadamard product as the weight update.

Paper: Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
ICLR 2022 (https://arxiv.org/abs/2108.06098); the LyCORIS implementation Hugging Face PEFT follows.

For a frozen weight W₀ (out × in; a convolution's kernel flattened into ``in``) and rank r::

    ΔW = (W1a W1b) ⊙ (W2a W2b) · α/r        W1a, W2a: out × r     W1b, W2b: r × in

so ΔW can have rank up to r² from 2r(out + in) parameters. With ``use_effective_conv2d`` a convolution with a
kernel larger than 1 keeps it in a CP core instead: each factor is ``einsum(T, Wa, Wb)`` with T (r, r, *kernel)
and Wa (r, out), Wb (r, in). Tensor names, shapes and initialisation follow Hugging Face PEFT (``hada_w1_a``,
``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``hada_t1``, ``hada_t2``): Kaiming-uniform factors with W2b = 0, so
ΔW starts at zero (``init_weights=False``: W2b random too). Forward, dropout and merging: see
:mod:`peftkit.methods.lycoris`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import nn

from peftkit.core.registry import register_method
from peftkit.methods.lycoris import LycorisConfig, LycorisLayer, cp_weight, kaiming


class LoHaLayer(LycorisLayer):
    """LoHa adapters on an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    method = "LoHa"
    adapter_containers: ClassVar[tuple[str, ...]] = (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        #: CP cores, for adapters with ``use_effective_conv2d`` on a convolution
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()

    def add(self, name: str, rank: int, alpha: float, *, rank_dropout: float = 0.0, module_dropout: float = 0.0,
            effective_conv: bool = False, init_weights: bool | str = True) -> None:
        factory = self._factory()
        out, fan_in = self.out_features, self.in_features
        if self.takes_cp(effective_conv):
            for core in (self.hada_t1, self.hada_t2):
                core[name] = nn.Parameter(torch.empty(rank, rank, *self.cp_kernel, **factory))
            a_shape, b_shape = (rank, out), (rank, fan_in)
        else:
            a_shape, b_shape = (out, rank), (rank, fan_in * math.prod(self.kernel))
        for factors, shape in ((self.hada_w1_a, a_shape), (self.hada_w1_b, b_shape), (self.hada_w2_a, a_shape),
                               (self.hada_w2_b, b_shape)):
            factors[name] = nn.Parameter(torch.empty(shape, **factory))
        with torch.no_grad():  # in HF PEFT's order, so a seeded model starts from HF PEFT's values
            for factors in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                kaiming(factors[name])
            if init_weights:
                nn.init.zeros_(self.hada_w2_b[name])  # one zero factor: ΔW = 0
            else:
                kaiming(self.hada_w2_b[name])
            if name in self.hada_t1:
                kaiming(self.hada_t1[name])
                kaiming(self.hada_t2[name])
        self._add_common(name, rank, alpha, rank_dropout, module_dropout, rank_dropout_scale=True)

    def _product(self, name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (p[name] for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        if name in self.hada_t1:
            return cp_weight(self.hada_t1[name], w1a, w1b) * cp_weight(self.hada_t2[name], w2a, w2b)
        return cast(torch.Tensor, (w1a @ w1b) * (w2a @ w2b))


@register_method
@dataclass
class LoHa(LycorisConfig):
    """LoHa: ``W₀x + ((W1a W1b) ⊙ (W2a W2b))·(α/r) x`` on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (HF PEFT's
    ``LoHaConfig``; fields as in :class:`peftkit.methods.lycoris.LycorisConfig`)."""

    peft_type = "LOHA"
    layer_class = LoHaLayer
