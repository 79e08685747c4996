"""Training with HuggingFace Accelerate: ``fit`` wires data, model, checkpoints and the run's tracker around the
tensor work of :mod:`.loop` (``train_one_epoch``, ``validate``), the per-step work of :mod:`.callbacks` (logging,
scheduled validation, checkpoints, early stopping) and :mod:`.resume`.

The same code runs on one CPU, under ``accelerate launch`` on N CPU ranks (gloo) or on N GPUs. Only the main process
records anything (its :class:`~segmentation.training.hooks.RunTracker`; the other ranks get a
:class:`~segmentation.training.hooks.NullTracker`); every rank takes part in ``save_state`` and the metric gathers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from segmentation.config import Config
from segmentation.data.classes import ClassInfo
from segmentation.data.datasets import build_dataloader, load_split, resolve_split_table
from segmentation.models import build_model
from segmentation.training.callbacks import TrainingRun, ask_to_stop, on_step, validate_and_save
from segmentation.training.checkpoint import CHECKPOINT_DIR, JOURNAL_DIR, STATE_FILE, TrainerState, logged_model_name
from segmentation.training.checkpoint_manager import CheckpointManager
from segmentation.training.hooks import NullTracker, RunTracker
from segmentation.training.loop import build_accelerator, plan_steps, set_epoch, train_one_epoch, validate
from segmentation.training.losses import build_loss
from segmentation.training.optim import build_optimizer, build_scheduler
from segmentation.training.resume import resume_from_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_id: str | None
    global_step: int
    metrics: dict[str, float]
    best_checkpoint: Path | None
    model_version: str | None = None
    delivered: bool = True  # False: the tracker's journal still holds records the server did not get


def _check_classes(cfg: Config, classes: ClassInfo) -> None:
    if classes.num_classes != cfg.model.num_classes:
        table = resolve_split_table(cfg.data.root, cfg.data.split_id)
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the data's classes.csv (beside {table}) lists "
            f"{classes.num_classes} classes ({', '.join(classes.names[:5])}...); set model.num_classes="
            f"{classes.num_classes} or train on data labelled with {cfg.model.num_classes} classes"
        )


def _start(run: TrainingRun, resume: bool, table: Any) -> None:
    """Log what the run starts from (config, tags, datasets); when resuming, restore the run's state too."""
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
    if resume:
        resume_from_checkpoint(run)


def _register_best(run: TrainingRun, registered_model: str) -> None:
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
    run = TrainingRun(
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
            lambda *a: on_step(run, *a),
        )
        if not stop:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    run.progress.close()
    if not state.history or state.history[-1]["step"] != state.global_step:
        # The loop ended off the validation schedule (early stop keeps its last one); there is nothing left to stop.
        ask_to_stop(run, state.global_step, validate_and_save(run))
    if accelerator.is_main_process and log_model and registered_model:
        _register_best(run, registered_model)
    delivered = tracker.end("FINISHED", tracking_timeout)
    return FitResult(run_id, state.global_step, state.metrics, checkpoints.best(), tracker.model_version, delivered)
