"""Resuming a training: the newest checkpoint every rank can load, falling back past damaged ones."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate.utils import broadcast_object_list, gather_object

from segmentation.training.callbacks import TrainingRun
from segmentation.training.checkpoint import STATE_FILE, TrainerState

logger = logging.getLogger(__name__)


def resume_from_checkpoint(run: TrainingRun) -> None:
    """Restore the newest checkpoint every rank can load into ``run`` (Accelerate's state and ``run.state``).

    A damaged checkpoint gives way to the one before it (local first, then the run's ``checkpoints/`` artifacts).
    The tracker then skips the steps it logged already and re-logs the checkpoint's validation metrics.

    Raises:
        ValueError: no usable checkpoint, locally or under the run's artifacts (the damaged ones are named).
    """
    accelerator, tracker = run.accelerator, run.tracker
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


def _load_checkpoint(run: TrainingRun, path: str) -> str | None:
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
