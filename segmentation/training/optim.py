"""Optimizers and per-iteration learning-rate schedules.

The reference recipe is SGD (lr 0.02, momentum 0.9, weight decay 5e-4 on every parameter, no Nesterov) with
``lr = base_lr * (1 - step / total_steps) ** 0.9`` updated every optimizer step and no warm-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("poly", "constant")


def build_optimizer(params: Iterable[Any], cfg: Any, lr: float) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name``.

    Args:
        params: model parameters (or param groups).
        cfg: a :class:`segmentation.config.OptimizerConfig`.
        lr: the base learning rate (``train.lr``).

    Returns:
        ``torch.optim.SGD`` or ``torch.optim.AdamW``.

    Raises:
        ValueError: unknown name (lists the valid ones), ``lr <= 0``, Nesterov without momentum, bad ``betas``.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer '{cfg.name}' (optimizer.name); available: {list(OPTIMIZERS)}")
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError(f"optimizer.nesterov=true needs optimizer.momentum > 0, got {cfg.momentum}")
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    betas = tuple(cfg.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(cfg.betas)}")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


@dataclass
class LRFactor:
    """The multiplier of the base learning rate after ``step`` optimizer steps.

    ``poly``: ``(1 - step / total_steps) ** power``, 0 from ``total_steps`` on; ``constant``: 1. During the first
    ``warmup_steps`` steps the factor is further multiplied by a linear ramp from ``warmup_start_factor`` to 1.
    A dataclass (not a lambda) so that the scheduler's ``state_dict`` saves and restores it.
    """

    name: str
    total_steps: int
    power: float = 0.9
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1

    def __call__(self, step: int) -> float:
        factor = 1.0
        if self.name == "poly":
            factor = max(0.0, 1.0 - step / self.total_steps) ** self.power
        if step < self.warmup_steps:
            factor *= self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> LambdaLR:
    """Per-iteration schedule: call ``scheduler.step()`` once after every ``optimizer.step()``.

    Step ``s`` (0-based count of optimizer steps taken) trains with ``base_lr * LRFactor(s)``.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        cfg: a :class:`segmentation.config.SchedulerConfig`.
        total_steps: optimizer steps of the whole run (the poly schedule reaches 0 there).

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR``.

    Raises:
        ValueError: unknown name (lists the valid ones), ``total_steps < 1``, ``warmup_steps`` outside
            ``[0, total_steps)``, ``warmup_start_factor`` outside ``(0, 1]``, negative ``power``.
    """
    if cfg.name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{cfg.name}' (scheduler.name); available: {list(SCHEDULERS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= cfg.warmup_steps < total_steps:
        raise ValueError(f"scheduler.warmup_steps must be in [0, {total_steps}) (total steps), got {cfg.warmup_steps}")
    if not 0 < cfg.warmup_start_factor <= 1:
        raise ValueError(f"scheduler.warmup_start_factor must be in (0, 1], got {cfg.warmup_start_factor}")
    if cfg.power < 0:
        raise ValueError(f"scheduler.power must be >= 0, got {cfg.power}")
    factor = LRFactor(cfg.name, total_steps, cfg.power, cfg.warmup_steps, cfg.warmup_start_factor)
    return LambdaLR(optimizer, factor)
