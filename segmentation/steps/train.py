"""The ``train`` step: resolve the recipe, start (or resume) the MLflow run, train with Accelerate, register the best
model; with ``num_processes > 1`` the same step re-launches itself under ``accelerate launch``."""

from __future__ import annotations

import logging

from segmentation.config import Config
from segmentation.mlops.connection import TrackingIncompleteError
from segmentation.mlops.run_guard import release_run_lock
from segmentation.mlops.runs import start_run
from segmentation.training.engine import FitResult, fit
from segmentation.training.launch import inside_launch, is_main_process, relaunch

logger = logging.getLogger(__name__)


def train_step(
    cfg: Config,
    *,
    resume_run_id: str | None = None,
    experiment: str | None = None,
    registered_model: str | None = None,
    run_name: str | None = None,
    log_model: bool = True,
    track: bool = True,
    tracking_timeout: float = 120.0,
) -> FitResult:
    """Train ``cfg`` in one MLflow run (the one ``mlflow run`` made, a new one, or ``resume_run_id``'s).

    Args:
        cfg: the resolved config.
        resume_run_id: continue this MLflow run from its last complete checkpoint (local, else its artifacts); only a
            training run of the same experiment, trained with a compatible config, that no other process is training.
        experiment: experiment name when not started by ``mlflow run``.
        registered_model: register the best weights as a new version of this model (empty: do not register).
        run_name: name of a new run.
        log_model: log the best weights as the run's model (False skips it and the registration).
        track: False trains without MLflow at all (no server needed; checkpoints under ``<output_dir>/untracked-*``).
        tracking_timeout: seconds to wait at the end for the tracking journal to reach the server.

    Raises:
        ConnectionError: the tracking server is unreachable (checked before anything is built).
        ValueError: a resume refused before the run is touched (see :func:`segmentation.mlops.runs.start_run`).
        FileNotFoundError, ValueError, FloatingPointError: see :func:`segmentation.training.engine.fit`.
        TrackingIncompleteError: training finished (checkpoints and model saved locally) but the tracking server
            did not receive everything; ``exc.result`` is the FitResult and the message gives the command that
            uploads the rest.
    """
    enabled = is_main_process() and track
    tracker = start_run(
        experiment, resume_run_id, run_name, enabled=enabled, durable=True, train=True, resume_config=cfg
    )
    try:
        result = fit(
            cfg,
            tracker,
            resume=bool(resume_run_id),
            registered_model=registered_model,
            log_model=log_model,
            tracking_timeout=tracking_timeout,
        )
    finally:
        release_run_lock(tracker.run_id)  # after the run's end status was sent
    if not result.delivered:
        error = TrackingIncompleteError(
            f"training finished (best checkpoint {result.best_checkpoint}) but the tracking server "
            f"{tracker.tracking_uri} did not receive everything: {tracker.undelivered()}"
        )
        error.result = result
        raise error
    logger.info(
        "run %s finished at step %d: %s",
        result.run_id,
        result.global_step,
        {k: round(v, 4) for k, v in result.metrics.items() if "/IoU/" not in k},
    )
    return result


def launch_train_step(num_processes: int, cfg: Config, module_argv: list[str]) -> int | None:
    """Re-launch ``python -m <module_argv>`` on ``num_processes`` ranks when that is asked for and this process is
    not a rank already; returns the launch's exit code, or None when this process should train itself."""
    if num_processes > 1 and not inside_launch():
        return relaunch(num_processes, module_argv, cpu=cfg.system.cpu)
    return None
