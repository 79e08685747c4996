"""Optimizer builders and the per-iteration poly schedule with warm-up."""

from __future__ import annotations

import pytest
import torch

from segmentation.config import OptimizerConfig, SchedulerConfig
from segmentation.training.optim import build_optimizer, build_scheduler

LR = 0.02


def lr_after(cfg: SchedulerConfig, total_steps: int, steps: int) -> float:
    """The learning rate used by the optimizer step that follows ``steps`` completed steps."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig(), LR)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, LR), (50, LR * 0.5**0.9), (75, LR * 0.25**0.9), (99, LR * 0.01**0.9), (100, 0.0), (120, 0.0)],
)
def test_poly(step, expected):
    assert lr_after(SchedulerConfig(name="poly", power=0.9), 100, step) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, LR * 0.1), (5, LR * 0.55 * 0.95**0.9), (10, LR * 0.9**0.9), (50, LR * 0.5**0.9)],
)
def test_poly_with_linear_warmup(step, expected):
    cfg = SchedulerConfig(name="poly", power=0.9, warmup_steps=10, warmup_start_factor=0.1)
    assert lr_after(cfg, 100, step) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("step", "expected"), [(0, LR * 0.5), (2, LR * 0.75), (4, LR), (90, LR)])
def test_constant_with_warmup(step, expected):
    cfg = SchedulerConfig(name="constant", warmup_steps=4, warmup_start_factor=0.5)
    assert lr_after(cfg, 100, step) == pytest.approx(expected, rel=1e-9)


def test_scheduler_state_round_trip():
    cfg = SchedulerConfig(name="poly", warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], OptimizerConfig(), LR)
    scheduler = build_scheduler(optimizer, cfg, 20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    resumed_optimizer = build_optimizer([param], OptimizerConfig(), LR)
    resumed = build_scheduler(resumed_optimizer, cfg, 20)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(lr_after(cfg, 20, 8), rel=1e-12)


def test_sgd_and_adamw_settings():
    params = [torch.nn.Parameter(torch.zeros(1))]
    sgd = build_optimizer(params, OptimizerConfig(name="sgd", momentum=0.8, weight_decay=1e-4, nesterov=True), 0.1)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.8, 1e-4, True)
    adamw = build_optimizer(params, OptimizerConfig(name="adamw", betas=[0.8, 0.99], weight_decay=0.01), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.99) and adamw.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize(
    ("cfg", "lr", "message"),
    [
        (OptimizerConfig(name="lamb"), LR, r"Unknown optimizer 'lamb'.*sgd.*adamw"),
        (OptimizerConfig(nesterov=True, momentum=0.0), LR, "nesterov=true needs optimizer.momentum > 0"),
        (OptimizerConfig(name="adamw", betas=[0.9]), LR, "optimizer.betas"),
        (OptimizerConfig(), 0.0, "train.lr must be > 0"),
    ],
)
def test_optimizer_errors(cfg, lr, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, lr)


@pytest.mark.parametrize(
    ("cfg", "total", "message"),
    [
        (SchedulerConfig(name="cosine"), 10, r"Unknown scheduler 'cosine'.*poly.*constant"),
        (SchedulerConfig(warmup_steps=10), 10, r"warmup_steps must be in \[0, 10\)"),
        (SchedulerConfig(), 0, "total_steps must be >= 1"),
        (SchedulerConfig(warmup_steps=2, warmup_start_factor=0.0), 10, "warmup_start_factor"),
    ],
)
def test_scheduler_errors(cfg, total, message):
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig(), LR)
    with pytest.raises(ValueError, match=message):
        build_scheduler(optimizer, cfg, total)
