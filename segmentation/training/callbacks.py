"""What runs after each optimizer step of :func:`~segmentation.training.engine.fit`: the training scalars every
``log_every_n_steps``, and on the validation schedule a validation pass, its checkpoint (with the model package, as a
LoggedModel), metrics and pictures, then the config's ``callbacks`` (checkpoint monitor, early stopping) and the
caller's ``on_validation`` decide whether training stops.

Only the main process records anything; every rank validates, saves and learns the stop decision together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from segmentation.config import Config
from segmentation.data.classes import ClassInfo
from segmentation.evaluation.visualize import render_confusion_matrix, render_panel
from segmentation.models.package import save_model_package
from segmentation.models.preprocessing import to_bgr_image
from segmentation.training.checkpoint import TrainerState, logged_model_name
from segmentation.training.checkpoint_manager import CheckpointManager
from segmentation.training.hooks import RunTracker
from segmentation.training.loop import validate

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything the per-step callback and a resume need; one per ``fit``."""

    cfg: Config
    accelerator: Any
    model: Any
    criterion: Any
    optimizer: Any
    scheduler: Any
    val_loader: Any
    classes: ClassInfo
    tracker: RunTracker
    checkpoints: CheckpointManager
    state: TrainerState
    total_steps: int
    on_validation: Callable[[int, dict[str, float]], bool] | None = None
    progress: Any = None
    losses: list[float] = field(default_factory=list)
    images: int = 0
    tic: float = field(default_factory=time.perf_counter)
    log_models: bool = True  # each checkpoint becomes a LoggedModel of the run (its package under models/)
    val_dataset: tuple[str, str] | None = None  # (name, digest) the validation metrics are linked to


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (NaN never improves)."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def validate_and_save(run: TrainingRun) -> dict[str, float]:
    """Validate, update early stopping, save a checkpoint (a LoggedModel too), then log metrics and pictures.

    The checkpoint's model is queued before the metrics so that they are logged linked to it (``model_id``) and to
    the validation dataset: the model page shows the scores that chose it.
    """
    cfg, state = run.cfg, run.state
    result, matrix, sample = validate(
        run.model, run.criterion, run.val_loader, run.accelerator, cfg.model.num_classes, cfg.data.ignore_index
    )
    metrics = {"val/loss": result["loss"], "val/mIoU": result["mIoU"], "val/pixel_acc": result["pixel_acc"]}
    metrics |= {f"val/IoU/{name}": v for name, v in zip(run.classes.names, result["iou"], strict=True)}
    step = state.global_step
    monitor = cfg.callbacks.checkpoint
    value = metrics.get(monitor.monitor, math.nan)
    state.history.append({"step": step, "value": value})
    if is_better(value, state.best_metric, monitor.mode):
        state.best_metric, state.best_step = value, step
    stop = cfg.callbacks.early_stopping
    if stop.enabled:
        es_value = metrics.get(stop.monitor, math.nan)
        if is_better(es_value, state.early_stopping_best, stop.mode, stop.min_delta):
            state.early_stopping_best, state.early_stopping_counter = es_value, 0
        else:
            state.early_stopping_counter += 1
    state.metrics = metrics
    keep_model = run.log_models and run.accelerator.is_main_process and run.tracker.enabled
    write_package = _package_writer(run) if keep_model else None
    checkpoint = run.checkpoints.save(run.accelerator, state, write_package)
    model = logged_model_name(checkpoint) if write_package else None
    run.tracker.log_metrics(metrics, step=step, dataset=run.val_dataset, model=model)
    if run.tracker.enabled and cfg.train.num_val_images_logged > 0 and sample is not None:
        image, mask, pred = sample
        panel = render_panel(to_bgr_image(image), mask.numpy(), pred.numpy(), run.classes, title=f"step {step}")
        run.tracker.log_image(panel, key="val/prediction", step=step)
        run.tracker.log_image(render_confusion_matrix(matrix, run.classes.names), key="val/confusion", step=step)
    return metrics


def ask_to_stop(run: TrainingRun, step: int, metrics: dict[str, float]) -> bool:
    """Call ``run.on_validation`` on the main rank; every rank gets its answer (they must stop together)."""
    if run.on_validation is None:
        return False
    stop = bool(run.on_validation(step, dict(metrics))) if run.accelerator.is_main_process else False
    return bool(broadcast_object_list([stop])[0])


def on_step(run: TrainingRun, loss: float, images: int, lr: float) -> bool:
    """Log training scalars, validate on schedule; True stops training (last step or early stopping)."""
    cfg, step = run.cfg, run.state.global_step
    run.losses.append(loss)
    run.images += images * run.accelerator.num_processes
    if run.progress is not None:
        run.progress.update(1)
        run.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    if step % cfg.train.log_every_n_steps == 0:
        mean_loss = run.accelerator.reduce(
            torch.tensor(np.mean(run.losses), device=run.accelerator.device), reduction="mean"
        ).item()
        elapsed = time.perf_counter() - run.tic
        run.tracker.log_metrics(
            {"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": run.images / max(elapsed, 1e-9)}, step=step
        )
        run.losses, run.images, run.tic = [], 0, time.perf_counter()
    last = step >= run.total_steps
    if step % cfg.train.val_every_n_steps == 0 or last:
        metrics = validate_and_save(run)
        if ask_to_stop(run, step, metrics):
            logger.info("stopped at step %d: on_validation asked to stop", step)
            return True
        patience = cfg.callbacks.early_stopping
        if patience.enabled and run.state.early_stopping_counter >= patience.patience:
            logger.info(
                "early stopping at step %d: no improvement of %s for %d validations",
                step,
                patience.monitor,
                patience.patience,
            )
            return True
    return last


def _package_writer(run: TrainingRun):
    """Writes the model package of the current weights (main rank), for the checkpoint being saved."""

    def write(folder: Path) -> None:
        save_model_package(run.accelerator.unwrap_model(run.model), run.classes, run.cfg.model, folder)

    return write
