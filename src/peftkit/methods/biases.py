"""The ``bias`` option of methods whose layers wrap a base layer (VeRA, FourierFT, OFT, BOFT, HRA, MiSS and others).

As in HF PEFT: ``"none"``, ``"all"`` (every bias outside the adapters, as LoRA's), or the method's own
``"<x>_only"`` (the biases of the layers it adapts). The trained biases are saved under HF PEFT's keys.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.methods.lora import bias_modules, hf_module_paths, train_biases

__all__ = ["AdaptedBiases", "adapted_bias_tensors", "train_adapted_biases"]


def _bias_modules(model: nn.Module, mode: str, layer: type[AdapterLayer], only: str) -> list[nn.Module]:
    """Modules whose bias trains under ``bias=mode`` (``only``: the base layers of the ``layer`` wrappers)."""
    if mode != only:
        return bias_modules(model, mode)
    bases = [m.base_layer for m in model.modules() if isinstance(m, layer)]
    return [m for m in bases if isinstance(getattr(m, "bias", None), nn.Parameter)]


def train_adapted_biases(model: nn.Module, mode: str, layer: type[AdapterLayer], only: str) -> None:
    """Make the biases of ``bias=mode`` trainable, for a method wrapping its targets in ``layer`` whose own mode
    ``only`` trains the adapted layers' biases."""
    if mode == "all":
        train_biases(model, "all")  # not a modules_to_save original's: its copy trains instead
    for module in _bias_modules(model, "none" if mode == "all" else mode, layer, only):
        cast(torch.Tensor, module.bias).requires_grad_(True)


def adapted_bias_tensors(model: nn.Module, name: str, mode: str, layer: type[AdapterLayer],
                         only: str) -> dict[str, torch.Tensor]:
    """The biases ``bias=mode`` trains (as ``train_adapted_biases``), under HF PEFT's keys for adapter ``name``."""
    paths = hf_module_paths(model, name)
    return {f"base_model.model.{paths[id(m)]}.bias": cast(torch.Tensor, m.bias)
            for m in _bias_modules(model, mode, layer, only)}


class AdaptedBiases:
    """Mixin for a method config with a ``bias`` field: ``after_apply`` makes the biases it selects trainable and
    ``extra_tensors`` saves them, given the method's layer type (``bias_layer``) and its spelling of "the adapted
    layers' biases" (``bias_only``, e.g. ``"vera_only"``), which ``peftkit compare`` also reads."""

    bias: str
    bias_layer: ClassVar[type[AdapterLayer]]
    bias_only: ClassVar[str]

    def after_apply(self, model: nn.Module, name: str) -> None:
        train_adapted_biases(model, self.bias, self.bias_layer, self.bias_only)

    def extra_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The trained biases, under HF PEFT's keys."""
        return adapted_bias_tensors(model, name, self.bias, self.bias_layer, self.bias_only)
