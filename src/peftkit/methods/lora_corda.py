"""CorDA: LoRA factors from the base weight, decomposed in the context of each layer's input covariance.

Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models"
(https://arxiv.org/abs/2406.05223). For a target with weight W (out × in) and the covariance C of its inputs over
some data (each call's input scaled by its maximum, ``XᵀX`` summed, divided by the number of calls), CorDA takes the
SVD ``W C = U S Vᵀ`` and sets ``V' = C⁻¹ V`` (C damped by a multiple of its mean diagonal until it inverts well), so
that ``W = U S V'ᵀ``. It keeps r triplets:

* **IPM** (instruction-previewed mode, ``method="ipm"``): the r largest, the directions the task's data excites most;
  training starts from them (faster convergence, as PiSSA).
* **KPM** (knowledge-preserved mode, ``method="kpm"``): the r smallest, so that the directions that carry the data
  used for the covariance (e.g. questions whose answers the model should keep knowing) stay in the frozen residual.

With ``s`` the adapter's scale, ``A = diag(√(S_r/s)) V'_rᵀ`` and ``B = U_r diag(√(S_r/s))``, and the base weight
becomes the residual ``W − s·BA``: the output is unchanged, and the adapter is only meaningful on that residual, as
with PiSSA (see :mod:`peftkit.methods.lora_init` for saving it as a plain adapter of the original weights).

Usage: ``pk.apply(model, pk.LoRA(init="corda", ...))`` adds the adapter as plain LoRA; ``pk.init_corda(model,
run_model)`` calls ``run_model()`` (which runs the model over the data) with adapters disabled, collects the
covariances and writes factors and residuals. The arithmetic follows HF PEFT's ``preprocess_corda`` and
``corda_init``, so the same data gives its factors and residual weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from peftkit.core.state import disable_adapters, get_state
from peftkit.errors import ConfigError
from peftkit.methods.lora_init import data_init_layers
from peftkit.methods.lora_layers import LoRALinear

if TYPE_CHECKING:
    from peftkit.methods.lora import LoRA

CORDA_METHODS = ("ipm", "kpm")


class _Covariance:
    """A forward hook summing ``XᵀX`` of a layer's inputs (each call scaled by the input's maximum)."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname
        self.calls = 0
        self.sum: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()  # HF PEFT takes one sample per call: (1, T, in) → (T, in)
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ConfigError(f"pk.init_corda: the input of {self.qualname!r} has NaN or infinite values (or is all "
                              "zero) in this call; run the model on real data in run_model")
        covariance = x.t() @ x
        self.calls += 1
        self.sum = covariance if self.sum is None else self.sum + covariance


def _checked(model: nn.Module, run_model: Any, name: str, method: str) -> list[str]:
    """Refuse bad arguments before anything runs; the qualified names of adapter ``name``'s layers."""
    names = data_init_layers(model, name, "corda", "CorDA")
    if method not in CORDA_METHODS:
        raise ConfigError(f"method={method!r} must be 'ipm' (instruction-previewed: train the data's main "
                          "directions) or 'kpm' (knowledge-preserved: keep them frozen)")
    if not callable(run_model):
        raise ConfigError(f"run_model={run_model!r} must be a function that runs the model over the data, e.g. "
                          "lambda: [model(**batch) for batch in batches]")
    for q in names:
        if name in cast(LoRALinear, model.get_submodule(q)).initial_factors:
            raise ConfigError(f"pk.init_corda: adapter {name!r} was already initialised by CorDA ({q!r} holds its "
                              "residual weight); apply a new adapter to the original model to run it again")
    return names


def _covariances(model: nn.Module, names: list[str], run_model: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Each layer's mean input covariance while ``run_model()`` runs the base model (eval mode, adapters off)."""
    hooks = {q: _Covariance(q) for q in names}
    handles = [model.get_submodule(q).register_forward_hook(hook) for q, hook in hooks.items()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), disable_adapters(model):
            run_model()
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    idle = [q for q, hook in hooks.items() if hook.sum is None]
    if idle:
        raise ConfigError(f"pk.init_corda: run_model never ran {idle[0]!r} ({len(idle)} of {len(names)} target "
                          "layers had no input); it must call the model on the data, e.g. "
                          "lambda: [model(**batch) for batch in batches]")
    return {q: cast(torch.Tensor, hook.sum) / hook.calls for q, hook in hooks.items()}


def decompose(weight: torch.Tensor, covariance: torch.Tensor, rank: int, method: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V'_r)`` of ``weight`` (out × in, fp32) in the context of ``covariance`` (in × in): the r
    largest (``"ipm"``) or smallest (``"kpm"``) triplets of ``W C = U S Vᵀ``, with ``V' = C⁻¹ V``."""
    damp = 0.01
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    while True:  # damp C until its inverse is accurate (HF PEFT's loop and tolerance)
        fixed = covariance + torch.diag(torch.ones(covariance.shape[0], device=covariance.device)
                                        * torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    V = (Vh @ inverse).transpose(0, 1)
    kept = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return U[:, kept], S[kept], V[:, kept]


@torch.no_grad()
def init_corda(model: nn.Module, run_model: Callable[[], object], *, name: str = "default", method: str = "ipm",
               show_progress: bool = True) -> None:
    """Initialise adapter ``name`` (applied with ``pk.LoRA(init="corda", ...)``) by CorDA.

    Args:
        model: the model holding the adapter.
        run_model: runs the model over the data whose input covariance guides the decomposition, e.g.
            ``lambda: [model(**batch) for batch in batches]``; called once, with adapters disabled, in eval mode and
            under ``torch.no_grad()``. HF PEFT runs one sample per call (every call's input is scaled by its maximum):
            batches of one sample give its factors.
        name: the adapter.
        method: ``"ipm"`` (the r largest context-oriented directions train) or ``"kpm"`` (the r smallest).
        show_progress: a progress bar over the layers being decomposed.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        ConfigError: the adapter is not ``init="corda"``, is merged or was already initialised; an unknown
            ``method``; ``run_model`` is not callable, never ran a target layer, or fed it NaN or infinite values.
            All before the model changes.
    """
    names = _checked(model, run_model, name, method)
    covariances = _covariances(model, names, run_model)
    layers = [(q, cast(LoRALinear, model.get_submodule(q))) for q in names]
    if show_progress:
        from tqdm.auto import tqdm

        layers = list(tqdm(layers, desc="CorDA", unit="layer", leave=False, dynamic_ncols=True))
    for q, layer in layers:
        _initialize(layer, name, covariances.pop(q), method)
    config = cast("LoRA", get_state(model).configs[name])
    get_state(model).configs[name] = config.replace(extra={**config.extra, "corda_config": {"corda_method": method}})


def _initialize(layer: LoRALinear, name: str, covariance: torch.Tensor, method: str) -> None:
    """Write ``layer``'s CorDA factors and its residual weight, keeping the factors for ``convert_to_lora``."""
    kind, scale = layer.kind, layer.scaling[name]
    weight = kind.weight(layer.base_layer)
    work = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    U, S, V = decompose(work.float(), covariance.to(work.device).float(), layer.rank[name], method)
    S = S / scale
    A0 = (V.t() * S.sqrt().view(-1, 1)).to(work.dtype)
    B0 = (U * S.sqrt()).to(work.dtype)
    kind.set_weight(layer.base_layer, (work - scale * B0 @ A0).to(weight.dtype))
    A, B = layer.factor_weights(name)
    A.copy_(A0)
    B.copy_(B0)
    layer.initial_factors[name] = (A0.to("cpu", A.dtype, copy=True), B0.to("cpu", B.dtype, copy=True))
