"""Optimizers: AdamW, LoRA+ parameter groups, GaLore, and LISA layer sampling.

**LoRA+** (Hayou et al., 2024, arXiv:2402.12354): LoRA's B matrices learn ``ratio`` times faster
than A — they get their own parameter group with ``lr_B = ratio · lr`` (the paper suggests 16). As in HF PEFT's
``create_loraplus_optimizer`` (and the paper's code), the other trainable 1-D parameters (biases, norm weights) join
B's learning rate, biases and ``nn.LayerNorm`` parameters without weight decay. Two deliberate differences: DoRA's
magnitudes keep ``lr`` (HF PEFT: ``ratio · lr``, being 1-D), and LoRA on an embedding follows the same A/B rule (HF
PEFT: both factors at a fixed ``loraplus_lr_embedding``, 1e-6 by default).

**GaLore** (Zhao et al., 2024, arXiv:2403.03507, Algorithm 1): for a 2-D weight W ∈ R^{m×n} with
gradient G, every ``T`` steps take ``U, S, Vᵀ = svd(G)``; project to rank r on the shorter side::

    m < n:  P = U[:, :r],   R = Pᵀ G  (r×n),   back: ΔW = α · P N
    m ≥ n:  Q = V[:, :r],   R = G Q   (m×r),   back: ΔW = α · N Qᵀ

Adam runs on R (moments in the low-rank space): ``M ← β₁M + (1-β₁)R``, ``V ← β₂V + (1-β₂)R²``,
``N = (M / (1-β₁ᵗ)) / (√(V / (1-β₂ᵗ)) + ε)``; then ``W ← W - η ΔW - η λ W``. Full-rank training
with optimizer memory O(r·n) instead of O(m·n).

**LISA** (Pan et al., 2024, arXiv:2403.17919): train only ``k`` randomly chosen transformer layers
at a time (drawn from all of the model's layer stacks: an encoder-decoder's encoder and decoder blocks
together), re-sampled every ``interval`` steps; embeddings and head (everything outside the layer
list) stay trainable. The sample depends only on (seed, step), so a resumed run samples the same.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.train.config import OptimizerConfig


def _container_parameters(model: nn.Module, containers: tuple[str, ...]) -> list[nn.Parameter]:
    """The parameters held in the adapter layers' containers named ``containers`` (found by the layers' types)."""
    from peftkit.core.state import adapter_layers

    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, layer in adapter_layers(model):
        for attr in layer.adapter_containers:
            if attr not in containers:
                continue
            container = getattr(layer, attr)
            for key in container:
                item = container[key]
                for p in [item] if isinstance(item, nn.Parameter) else item.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
    return out


def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """LoRA's B (up-projection) parameters: those in an adapter layer's ``lora_B``/``lora_embedding_B`` containers.

    Found through the adapter layers (``peftkit.core.layer.AdapterLayer``), never by parameter-name
    substrings.
    """
    return _container_parameters(model, ("lora_B", "lora_embedding_B"))


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Biases and ``nn.LayerNorm`` parameters: LoRA+ trains them without weight decay, as HF PEFT does."""
    return {id(p) for module in model.modules() for local, p in module.named_parameters(recurse=False)
            if local == "bias" or isinstance(module, nn.LayerNorm)}


#: The ``peft.method`` values whose models train LoRA B matrices, which LoRA+ (``optimizer.loraplus_ratio``) speeds up.
LORAPLUS_METHODS = ("lora", "dora", "canonical_lora", "adalora")


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Parameter groups over the trainable parameters: LoRA+ B groups and GaLore group when configured.

    With LoRA+, B matrices and the other 1-D parameters except DoRA magnitudes get ``lr · loraplus_ratio``
    (``lora_B``; biases and LayerNorm parameters in ``lora_B_no_decay``, without weight decay).

    Returns:
        Groups with ``params``, ``lr`` and a ``name`` (``default``, ``lora_B``, ``lora_B_no_decay``, ``galore``);
        groups without parameters are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b_ids: set[int] = set()
    slow_ids: set[int] = set()
    if cfg.loraplus_ratio > 0:
        b_ids = {id(p) for p in lora_b_parameters(model)}
        if not any(p.requires_grad for p in lora_b_parameters(model)):
            raise ConfigError(
                f"optimizer.loraplus_ratio={cfg.loraplus_ratio:g} speeds up LoRA's B matrices, and this model trains "
                f"none (LoRA+ applies to peft.method {', '.join(LORAPLUS_METHODS)}); set optimizer.loraplus_ratio=0"
            )
        slow_ids = {id(p) for p in _container_parameters(model, ("lora_magnitude_vector",))}
    no_decay = _no_decay_ids(model)
    default: list[nn.Parameter] = []
    fast: list[nn.Parameter] = []
    fast_no_decay: list[nn.Parameter] = []
    galore: list[nn.Parameter] = []
    for name, p in named:
        if id(p) in b_ids or (cfg.loraplus_ratio > 0 and p.dim() == 1 and id(p) not in slow_ids):
            (fast_no_decay if id(p) in no_decay else fast).append(p)
        elif cfg.name == "galore" and p.dim() == 2 and any(fnmatch.fnmatchcase(name, g) for g in cfg.galore_targets):
            galore.append(p)
        else:
            default.append(p)
    groups = [
        {"name": "default", "params": default, "lr": cfg.lr},
        {"name": "lora_B", "params": fast, "lr": cfg.lr * cfg.loraplus_ratio},
        {"name": "lora_B_no_decay", "params": fast_no_decay, "lr": cfg.lr * cfg.loraplus_ratio, "weight_decay": 0.0},
        {
            "name": "galore",
            "params": galore,
            "lr": cfg.lr,
            "galore": True,
            "rank": cfg.galore_rank,
            "update_interval": cfg.galore_update_interval,
            "scale": cfg.galore_scale,
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s trainable parameters.

    ``adamw`` is ``torch.optim.AdamW`` (with the LoRA+ group if ``loraplus_ratio`` > 0); ``galore``
    is :class:`GaLoreAdamW`.
    """
    groups = param_groups(model, cfg)
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "galore":
        return GaLoreAdamW(groups, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


def galore_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's projector from ``grad``'s SVD: left ``U[:, :r]`` when m < n, else right ``V[:, :r]``."""
    u, _, vh = torch.linalg.svd(_wide(grad), full_matrices=False)
    m, n = grad.shape
    proj: torch.Tensor = u[:, :rank] if m < n else vh[:rank, :].T
    return proj.contiguous()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 unless it is already float32 or float64 (half-precision maths is too coarse here)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW where groups flagged ``galore`` keep low-rank moments of projected gradients.

    Groups take ``lr``, ``betas``, ``eps``, ``weight_decay``, and for GaLore groups ``rank``,
    ``update_interval`` and ``scale`` (see the module docstring for the update). Its state holds
    only tensors (``step``, ``exp_avg``, ``exp_avg_sq``, ``projector``), so it saves as safetensors.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "galore": False,
                "rank": 0,
                "update_interval": 1,
                "scale": 1.0,
            },
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                project = group["galore"] and p.dim() == 2 and min(p.shape) > group["rank"]
                grad = _wide(p.grad)
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                st["step"] += 1
                t = int(st["step"].item())
                if project:
                    if "projector" not in st or (t - 1) % group["update_interval"] == 0:
                        st["projector"] = galore_projector(grad, group["rank"])
                    P = st["projector"]
                    grad = P.T @ grad if p.shape[0] < p.shape[1] else grad @ P
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(grad)
                    st["exp_avg_sq"] = torch.zeros_like(grad)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                n = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                if project:
                    P = st["projector"]
                    n = group["scale"] * (P @ n if p.shape[0] < p.shape[1] else n @ P.T)
                p.add_(n.to(p.dtype), alpha=-group["lr"])
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def find_layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of transformer layers: each ``nn.ModuleList`` of two or more same-type blocks, not inside
    another such list. Where some are named like layer stacks (``layers``, ``layer``, ``h``, ``block``, ``blocks``)
    those are returned, so an encoder-decoder gives both its stacks (T5's ``encoder.block`` and
    ``decoder.block``); otherwise the longest list.

    Raises:
        ConfigError: the model has no such list (LISA needs one).
    """
    from peftkit.core.matching import DEFAULT_LAYER_CONTAINERS

    stacks = [(name, mod) for name, mod in model.named_modules()
              if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1]
    stacks = [(name, mod) for name, mod in stacks if not any(name.startswith(f"{outer}.") for outer, _ in stacks)]
    if not stacks:
        raise ConfigError(
            "optimizer.lisa_layers > 0 but the model has no list of transformer layers "
            "(an nn.ModuleList of same-type blocks); set optimizer.lisa_layers=0"
        )
    named = [(name, mod) for name, mod in stacks if name.rsplit(".", 1)[-1] in DEFAULT_LAYER_CONTAINERS]
    return named or [max(stacks, key=lambda found: len(found[1]))]


class Lisa:
    """LISA layer sampling: only ``k`` layers of the model's layer stacks (see :func:`find_layer_lists`; an
    encoder-decoder's two count as one list) train at a time.

    Args:
        model: the model; its parameters that are trainable now form the trainable set.
        layers: how many layers to train at a time.
        interval: steps between re-samplings.
        seed: the sample at step ``t`` depends only on ``(seed, t // interval)``.
    """

    def __init__(self, model: nn.Module, layers: int, interval: int, seed: int) -> None:
        stacks = find_layer_lists(model)
        self.name = ", ".join(name for name, _ in stacks)
        self.layer_list: list[nn.Module] = [layer for _, stack in stacks for layer in stack]
        self.k = min(layers, len(self.layer_list))
        self.interval = interval
        self.seed = seed
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layer_list]
        self.active: list[int] = []

    def sample(self, step: int) -> list[int]:
        """The layer indices trained during ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step // self.interval)
        return sorted(torch.randperm(len(self.layer_list), generator=g)[: self.k].tolist())

    def update(self, step: int) -> list[int]:
        """Switch ``requires_grad`` so exactly the sampled layers (plus everything outside the list) train."""
        self.active = self.sample(step)
        for i, params in enumerate(self.trainable):
            for p in params:
                p.requires_grad_(i in self.active)
                if i not in self.active:
                    p.grad = None
        return self.active


def iter_grads(params: Iterable[nn.Parameter]) -> Iterator[torch.Tensor]:
    """Gradients of the parameters that have one."""
    return (p.grad for p in params if p.grad is not None)


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """Global L2 norm of the gradients (0.0 when there are none)."""
    total = sum(float(g.float().pow(2).sum()) for g in iter_grads(params))
    return math.sqrt(total)
