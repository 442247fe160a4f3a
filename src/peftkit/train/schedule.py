"""Learning-rate schedules: linear warm-up, then cosine, linear or constant.

For optimizer step ``t`` (0-based) of ``T``, warm-up ``w`` and floor ``m = min_lr_ratio``::

    f(t) = t / w                                        t < w
    f(t) = m + (1 - m) · ½ (1 + cos(π p))  (cosine)     p = (t - w) / max(1, T - w)
    f(t) = m + (1 - m) · (1 - p)           (linear)
    f(t) = 1                               (constant)

Every parameter group's learning rate is ``group["base_lr"] · f(t)``, so LoRA+'s faster B group keeps
its ratio. The schedule is a pure function of the step: resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch

from peftkit.errors import ConfigError
from peftkit.train.config import SchedulerConfig


def lr_factor(step: int, total: int, warmup: int, name: str, min_ratio: float = 0.0) -> float:
    """The multiplier ``f(step)`` of the base learning rate (see the module docstring).

    Raises:
        ConfigError: an unknown schedule name.
    """
    if step < warmup:
        return step / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ConfigError(f"scheduler.name={name!r} is invalid; allowed: cosine, linear, constant")


class Schedule:
    """Sets each parameter group's learning rate for a given step.

    Args:
        optimizer: its groups get a ``base_lr`` entry (their lr at construction) if they lack one.
        config: the scheduler section.
        total_steps: the run's number of optimizer steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: SchedulerConfig, total_steps: int) -> None:
        self.optimizer = optimizer
        self.config = config
        self.total = total_steps
        self.warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def apply(self, step: int) -> float:
        """Set the learning rates for optimizer step ``step``; returns the first group's."""
        f = lr_factor(step, self.total, self.warmup, self.config.name, self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return float(self.optimizer.param_groups[0]["lr"])
