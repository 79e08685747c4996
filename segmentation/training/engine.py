"""Training with HuggingFace Accelerate: ``fit`` wires data, model, checkpoints and the run's tracker around the
tensor work of :mod:`.loop` (``train_one_epoch``, ``validate``).

The same code runs on one CPU, under ``accelerate launch`` on N CPU ranks (gloo) or on N GPUs. Only the main process
records anything (its :class:`~segmentation.training.hooks.RunTracker`; the other ranks get a
:class:`~segmentation.training.hooks.NullTracker`); every rank takes part in ``save_state`` and the metric gathers.
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
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from segmentation.config import Config
from segmentation.data.classes import ClassInfo
from segmentation.data.datasets import build_dataloader, load_split, resolve_split_table
from segmentation.evaluation.visualize import render_confusion_matrix, render_panel
from segmentation.models import build_model
from segmentation.models.package import save_model_package
from segmentation.models.preprocessing import to_bgr_image
from segmentation.training.checkpoint import (
    CHECKPOINT_DIR,
    JOURNAL_DIR,
    STATE_FILE,
    TrainerState,
    is_better,
    logged_model_name,
)
from segmentation.training.checkpoint_manager import CheckpointManager
from segmentation.training.hooks import NullTracker, RunTracker
from segmentation.training.loop import build_accelerator, plan_steps, set_epoch, train_one_epoch, validate
from segmentation.training.losses import build_loss
from segmentation.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_id: str | None
    global_step: int
    metrics: dict[str, float]
    best_checkpoint: Path | None
    model_version: str | None = None
    delivered: bool = True  # False: the tracker's journal still holds records the server did not get


@dataclass
class _Run:
    """Everything the per-step callback needs; one per ``fit``."""

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


def _validate_and_save(run: _Run) -> dict[str, float]:
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


def _ask_to_stop(run: _Run, step: int, metrics: dict[str, float]) -> bool:
    """Call ``run.on_validation`` on the main rank; every rank gets its answer (they must stop together)."""
    if run.on_validation is None:
        return False
    stop = bool(run.on_validation(step, dict(metrics))) if run.accelerator.is_main_process else False
    return bool(broadcast_object_list([stop])[0])


def _on_step(run: _Run, loss: float, images: int, lr: float) -> bool:
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
        metrics = _validate_and_save(run)
        if _ask_to_stop(run, step, metrics):
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


def _check_classes(cfg: Config, classes: ClassInfo) -> None:
    if classes.num_classes != cfg.model.num_classes:
        table = resolve_split_table(cfg.data.root, cfg.data.split_id)
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data's classes.csv (beside {table}) lists "
            f"{classes.num_classes} classes ({', '.join(classes.names[:5])}...); set model.num_classes="
            f"{classes.num_classes} or train on data labelled with {cfg.model.num_classes} classes"
        )


def _start(run: _Run, resume: bool, table: Any) -> None:
    """Log what the run starts from, or restore the state of the run being resumed."""
    accelerator, tracker = run.accelerator, run.tracker
    tracker.log_config(run.cfg)
    tracker.set_tags(
        {
            "segmentation.num_processes": accelerator.num_processes,
            "segmentation.checkpoint_dir": run.checkpoints.directory.resolve(),
        }
    )
    source = str(resolve_split_table(run.cfg.data.root, run.cfg.data.split_id))
    name = f"{Path(run.cfg.data.root).name}/{run.cfg.data.split_id}"
    # A resumed run has its inputs already: the references are only recomputed (same rows, same digest).
    tracker.log_dataset(table, source=source, name=name, context="training", log=not resume)
    val_rows = table[table["split"] == run.cfg.data.val_split].reset_index(drop=True)
    run.val_dataset = tracker.log_dataset(
        val_rows, source=source, name=f"{name}/{run.cfg.data.val_split}", context="validation", log=not resume
    )
    if not resume:
        return
    while True:  # the newest checkpoint every rank can load; a damaged one gives way to the one before it
        path = run.checkpoints.fetch_last() if accelerator.is_main_process else None
        path = broadcast_object_list([None if path is None else str(path)])[0]
        if path is None:
            damaged = "; ".join(f"{where}: {why}" for where, why in run.checkpoints.damaged.items())
            raise ValueError(
                f"cannot resume run {tracker.run_id}: no usable checkpoint in {run.checkpoints.directory} nor "
                f"under its 'checkpoints/' artifacts" + (f" (damaged: {damaged})" if damaged else "")
            )
        errors = [e for e in gather_object([_load_checkpoint(run, path)]) if e]
        if not errors:
            break
        logger.warning("checkpoint %s cannot be loaded (%s); trying the one before it", path, errors[0])
        run.checkpoints.mark_damaged(path, errors[0])
    tracker.skip_logged_steps()
    # A kill between a checkpoint's rename and the journaling of its validation leaves that step without metrics;
    # the checkpoint's state holds them. Keys already logged at this step or later are skipped.
    if run.state.metrics:
        tracker.log_metrics(run.state.metrics, step=run.state.global_step, dataset=run.val_dataset)
    logger.info("resumed run %s from %s at step %d", tracker.run_id, path, run.state.global_step)


def _load_checkpoint(run: _Run, path: str) -> str | None:
    """Restore Accelerate's state and the trainer state from ``path``; the error as text when that fails.

    A failure can leave part of the state loaded (the model, not the optimizer): the next checkpoint tried
    overwrites all of it.
    """
    try:
        run.accelerator.load_state(path)
        run.state = TrainerState.read(Path(path) / STATE_FILE)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: take the previous checkpoint
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def _package_writer(run: _Run):
    """Writes the model package of the current weights (main rank), for the checkpoint being saved."""

    def write(folder: Path) -> None:
        save_model_package(run.accelerator.unwrap_model(run.model), run.classes, run.cfg.model, folder)

    return write


def _register_best(run: _Run, registered_model: str) -> None:
    """Register the best checkpoint's LoggedModel as a new version of ``registered_model``; main process only."""
    best = run.checkpoints.best()
    if best is None:
        return
    best_state = TrainerState.read(best / STATE_FILE)
    version_tags = {
        "val/mIoU": best_state.metrics.get("val/mIoU"),
        "run_id": run.tracker.run_id,
        "step": best_state.global_step,
        "data_digest": run.tracker.dataset_digest,
    }
    run.tracker.register_model(logged_model_name(best), registered_model, version_tags)


def fit(
    cfg: Config,
    tracker: RunTracker | None = None,
    *,
    resume: bool = False,
    registered_model: str | None = None,
    log_model: bool = True,
    tracking_timeout: float = 120.0,
    on_validation: Callable[[int, dict[str, float]], bool] | None = None,
) -> FitResult:
    """Train ``cfg``, recording everything through ``tracker``; every process of a launch calls this.

    Args:
        cfg: the resolved config.
        tracker: the run's tracker on the main process (a :class:`NullTracker` elsewhere, or for no tracking).
        resume: continue the tracker's run from its last checkpoint (local, else its ``checkpoints/`` artifacts).
        registered_model: register the best weights as a new version of this model (empty: do not register).
        log_model: log each checkpoint as a LoggedModel and register the best (False skips both).
        tracking_timeout: seconds to wait at the end for the tracker's journal to reach the server.
        on_validation: called on the main process after each validation with ``(global step, metrics)``
            (``val/mIoU``, ``val/loss``...); returning True stops training there, as early stopping does (the
            best checkpoint is still logged). A hyperparameter search reports to its pruner through it.

    Returns:
        A :class:`FitResult`; ``delivered`` is False when the tracker could not send everything in time (the rest
        stays in its journal under ``<output_dir>/<run_id>/tracking``).

    Raises:
        FileNotFoundError: no split table at ``cfg.data.root`` (the message says to run preprocess).
        ValueError: bad config/data combination, fp16 on CPU, or a resume without checkpoint.
        FloatingPointError: the loss became non-finite (the message names the step).
    """
    tracker = tracker or NullTracker()
    try:
        return _fit(cfg, tracker, resume, registered_model, log_model, tracking_timeout, on_validation)
    except KeyboardInterrupt:
        tracker.end("KILLED", tracking_timeout)
        raise
    except BaseException:
        tracker.end("FAILED", tracking_timeout)
        raise


def _fit(
    cfg: Config,
    tracker: RunTracker,
    resume: bool,
    registered_model: str | None,
    log_model: bool,
    tracking_timeout: float,
    on_validation: Callable[[int, dict[str, float]], bool] | None,
) -> FitResult:
    accelerator = build_accelerator(cfg)
    table, classes, _ = load_split(cfg.data.root, cfg.data.split_id)
    _check_classes(cfg, classes)
    train_loader = build_dataloader(cfg, cfg.data.train_split, train=True)
    val_loader = build_dataloader(cfg, cfg.data.val_split, train=False)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.train.lr)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_loader), accelerator.num_processes)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    run_id = broadcast_object_list([tracker.run_id])[0]
    folder = broadcast_object_list([run_id or time.strftime("untracked-%Y%m%d-%H%M%S")])[0]
    out = Path(cfg.train.output_dir) / folder
    tracker.open_journal(out / JOURNAL_DIR)
    monitor = cfg.callbacks.checkpoint
    checkpoints = CheckpointManager(out / CHECKPOINT_DIR, monitor.monitor, monitor.mode, monitor.top_k, tracker)
    run = _Run(
        cfg,
        accelerator,
        model,
        build_loss(cfg.loss, cfg.model.num_classes),
        optimizer,
        scheduler,
        val_loader,
        classes,
        tracker,
        checkpoints,
        TrainerState(mlflow_run_id=run_id),
        total_steps,
        on_validation=on_validation,
        log_models=log_model,
    )
    logger.info(
        "rank %d/%d: %d steps (%d per epoch)",
        accelerator.process_index,
        accelerator.num_processes,
        total_steps,
        steps_per_epoch,
    )
    if cfg.train.sanity_val_batches > 0:  # before a resume restores the RNG: iterating a loader draws from it
        validate(
            model,
            run.criterion,
            val_loader,
            accelerator,
            cfg.model.num_classes,
            cfg.data.ignore_index,
            max_batches=cfg.train.sanity_val_batches,
        )
    _start(run, resume, table)
    state = run.state
    run.progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_main_process)
    stop = state.global_step >= total_steps
    while not stop and state.epoch < math.ceil(total_steps / steps_per_epoch):
        set_epoch(train_loader, state.epoch, cfg.system.seed)
        skip = state.batches_in_epoch  # > 0 only when resuming mid-epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        stop = train_one_epoch(
            model,
            run.criterion,
            optimizer,
            scheduler,
            loader,
            accelerator,
            state,
            cfg.train.clip_grad_norm,
            lambda *a: _on_step(run, *a),
        )
        if not stop:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    run.progress.close()
    if not state.history or state.history[-1]["step"] != state.global_step:
        # The loop ended off the validation schedule (early stop keeps its last one); there is nothing left to stop.
        _ask_to_stop(run, state.global_step, _validate_and_save(run))
    if accelerator.is_main_process and log_model and registered_model:
        _register_best(run, registered_model)
    delivered = tracker.end("FINISHED", tracking_timeout)
    return FitResult(run_id, state.global_step, state.metrics, checkpoints.best(), tracker.model_version, delivered)
