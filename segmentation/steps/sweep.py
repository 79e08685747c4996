"""The ``sweep`` step: an Optuna study whose trials train through the same ``fit`` as ``train``, each trial an MLflow
child run of this worker's parent run. Start several workers on the same study and storage to search in parallel.

A worker runs trials until the study holds ``n_trials`` finished ones (complete, pruned, or failed by their own
hyperparameters). When the trials left are all running elsewhere it waits for them, so that it can replace a trial
whose worker dies. Then it logs the study on its parent run and the worker that ran the best trial registers it.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric

from segmentation.config import Config
from segmentation.config_loading import ConfigError, resolve_train_config
from segmentation.data.classes import ClassInfo
from segmentation.data.datasets import SegmentationDataset, load_split
from segmentation.inference.predictor import load_predictor
from segmentation.mlops.connection import TrackingIncompleteError
from segmentation.mlops.runs import start_run
from segmentation.mlops.sweep import (
    FAILURE_ATTR,
    METRIC,
    RUN_ATTR,
    STUDY_TAG,
    WORKER_TAG,
    PruningReporter,
    default_storage,
    fail_lost_trials,
    finish_trial_run,
    open_study,
    progress,
    redact,
    start_trial_run,
    suggest,
    worker_name,
)
from segmentation.mlops.sweep_report import (
    GRID_IMAGES,
    log_prediction_grid,
    log_predictions,
    log_summary,
    register_best,
    top_trials,
    trial_metrics,
)
from segmentation.mlops.tracker import SYNC_COMMAND
from segmentation.training.checkpoint import CHECKPOINT_DIR, JOURNAL_DIR, MODEL_PACKAGE_DIR
from segmentation.training.engine import FitResult, fit
from segmentation.training.search_space import SearchSpace, check_against_config, load_search_space, trial_overrides

logger = logging.getLogger(__name__)

# A trial that fails because of its own values (a diverging loss, a combination the config refuses) is recorded
# and the sweep goes on; any other error stops the worker.
TRIAL_ERRORS = (FloatingPointError, ConfigError)


@dataclass(frozen=True)
class SweepParams:
    space: str
    n_trials: int = 20
    study: str = ""  # empty: the space file's name
    storage: str = ""  # empty: sqlite beside the tracking store (see segmentation.mlops.sweep.default_storage)
    config: str = "configs/synthetic.yaml"
    data: str = ""
    overrides: str = ""
    registered_model: str = "fchardnet"  # empty: register nothing
    heartbeat_interval: int = 10
    grace_period: int = 60
    experiment: str | None = None
    tracking_timeout: float = 120.0


@dataclass
class SweepResult:
    run_id: str
    study: str
    storage: str
    trials_run: list[int]
    best_trial: int | None = None
    best_value: float | None = None
    best_run_id: str | None = None
    model_version: str | None = None


@dataclass
class _Sweep:
    """What every trial of this worker needs."""

    params: SweepParams
    space: SearchSpace
    fixed: list[str]  # the space's overrides, then the command line's
    parent_run_id: str
    study: str
    samples: list[tuple[np.ndarray, np.ndarray]]
    ran: list[int] = field(default_factory=list)
    undelivered: list[str] = field(default_factory=list)  # trials whose tracking the server lacks, with the fix


def validation_samples(cfg: Config, count: int = GRID_IMAGES) -> tuple[list[tuple[np.ndarray, np.ndarray]], ClassInfo]:
    """The first ``count`` validation images with their masks (BGR uint8, uint8): the pictures of the grid."""
    table, classes, root = load_split(cfg.data.root, cfg.data.split_id)
    dataset = SegmentationDataset(table, cfg.data.val_split, None, root, classes.num_classes, cfg.data.ignore_index)
    return [dataset.read_raw(i) for i in range(min(count, len(dataset)))], classes


def _check(params: SweepParams) -> None:
    if params.n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {params.n_trials}")
    if params.heartbeat_interval < 1 or params.grace_period <= params.heartbeat_interval:
        raise ValueError(
            f"need heartbeat_interval >= 1 and grace_period > heartbeat_interval, got {params.heartbeat_interval} "
            f"and {params.grace_period} (a trial is declared lost after grace_period s without a heartbeat)"
        )


def _finish_outputs(cfg: Config, result: FitResult) -> None:
    """Remove a trial's local checkpoints and model package once MLflow holds its model (a trial is not resumed)."""
    if result.delivered and result.run_id:
        out = Path(cfg.train.output_dir) / result.run_id
        for name in (CHECKPOINT_DIR, MODEL_PACKAGE_DIR):
            shutil.rmtree(out / name, ignore_errors=True)


def _close_quietly(run_id: str, state: str, status: str, reason: str) -> None:
    try:
        finish_trial_run(run_id, state, status, reason)
    except Exception as exc:  # noqa: BLE001 - the trial's own error matters more than this bookkeeping
        logger.warning("could not close run %s: %s", run_id, exc)


def _objective(trial: optuna.Trial, sweep: _Sweep) -> float:
    params = sweep.params
    values = suggest(trial, sweep.space)
    tracker = start_trial_run(trial, sweep.parent_run_id, sweep.study)
    sweep.ran.append(trial.number)
    reporter = PruningReporter(trial)
    logger.info("trial %d (run %s): %s", trial.number, tracker.run_id, values)
    try:
        cfg = resolve_train_config(params.config, params.data, " ".join(sweep.fixed + trial_overrides(values)))
        result = fit(cfg, tracker, tracking_timeout=params.tracking_timeout, on_validation=reporter)
    except TRIAL_ERRORS as exc:
        trial.set_user_attr(FAILURE_ATTR, f"{type(exc).__name__}: {exc}"[:2000])
        _close_quietly(tracker.run_id, "failed", "FAILED", str(exc))
        raise
    except BaseException as exc:
        _close_quietly(tracker.run_id, "failed", "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", "")
        raise
    if not result.delivered:
        journal = Path(cfg.train.output_dir) / tracker.run_id / JOURNAL_DIR
        logger.warning("trial %d: the tracking server lacks part of it; `%s %s`", trial.number, SYNC_COMMAND, journal)
        sweep.undelivered.append(f"trial {trial.number}: `{SYNC_COMMAND} {journal}`")
    trial.set_user_attr("best_step", reporter.best_step)
    if reporter.pruned_at is not None:
        finish_trial_run(tracker.run_id, "pruned", "KILLED")
        _finish_outputs(cfg, result)
        raise optuna.TrialPruned(f"{METRIC} below the median of earlier trials at step {reporter.pruned_at}")
    if not math.isfinite(reporter.best):
        trial.set_user_attr(FAILURE_ATTR, f"{METRIC} was never a finite number")
        finish_trial_run(tracker.run_id, "failed", reason=f"{METRIC} was never a finite number")
        return reporter.best  # Optuna records a NaN objective as FAIL
    # The best checkpoint's model package (each kept checkpoint has one, logged as a LoggedModel of the trial).
    best = result.best_checkpoint
    package = Path(cfg.train.output_dir) / tracker.run_id / MODEL_PACKAGE_DIR / best.name if best else None
    if sweep.samples and package is not None and package.is_dir():
        predictor, _ = load_predictor(package, backend="eager")
        log_predictions(tracker.run_id, [predictor.predict_mask(image) for image, _ in sweep.samples])
    finish_trial_run(tracker.run_id, "complete")
    _finish_outputs(cfg, result)
    return reporter.best


def _run_trials(study: optuna.Study, sweep: _Sweep) -> None:
    """Start trials until the study has ``n_trials`` finished ones; wait while the rest run elsewhere."""
    client = MlflowClient()
    poll_s = max(1, min(sweep.params.heartbeat_interval, 5))
    while True:
        fail_lost_trials(study)
        finished, running = progress(study)
        if finished >= sweep.params.n_trials:
            return
        if finished + running >= sweep.params.n_trials:
            time.sleep(poll_s)  # another worker runs the last trials; take over if its worker dies
            continue
        before = len(sweep.ran)
        study.optimize(functools.partial(_objective, sweep=sweep), n_trials=1, catch=TRIAL_ERRORS, gc_after_trial=True)
        if len(sweep.ran) > before:
            number = sweep.ran[-1]
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            value = trial.value if trial.value is not None else math.nan
            best = top_trials(study, 1)
            metrics = trial_metrics(value, best[0].value if best else None)
            client.log_batch(sweep.parent_run_id, metrics=_metrics(metrics, number))


def _metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def sweep_step(params: SweepParams) -> SweepResult:
    """Run trials of the study ``params.study`` until it has ``params.n_trials`` finished trials; report on this
    worker's parent run and register the best trial's model.

    Raises:
        FileNotFoundError: the space, config or data does not exist.
        ConfigError: an invalid search space, or a bound the config refuses (the message names file and key).
        ValueError: bad n_trials/heartbeat settings, a malformed storage URL, or a study that minimises.
        ConnectionError: the tracking server or the storage database does not answer.
        TrackingIncompleteError: the study is done, but the tracking server lacks part of a trial or of the
            sweep's run (the message lists each with the command that uploads the rest; ``exc.result`` is the
            SweepResult).
    """
    _check(params)
    space = load_search_space(params.space)
    cli = params.overrides.split()
    check_against_config(space, params.config, ([f"data.root={params.data}"] if params.data else []) + cli)
    fixed = [*space.overrides, *cli]
    samples, classes = validation_samples(resolve_train_config(params.config, params.data, " ".join(fixed)))
    name = params.study or space.path.stem
    parent = start_run(params.experiment, run_name=f"sweep-{name}", log_system_metrics=False, durable=True)
    try:
        storage = params.storage or default_storage(parent.tracking_uri)
        study = open_study(name, storage, space, params.heartbeat_interval, params.grace_period, parent.tracking_uri)
        parent.set_tags(
            {STUDY_TAG: name, "sweep.storage": redact(storage), "sweep.space": space.path, WORKER_TAG: worker_name()}
        )
        parent.log_params(
            {"space": params.space, "n_trials": params.n_trials, "study": name, "storage": redact(storage)}
        )
        MlflowClient().log_text(parent.run_id, space.path.read_text(), "sweep/space.yaml")
        sweep = _Sweep(params, space, fixed, parent.run_id, name, samples)
        _run_trials(study, sweep)
        result = SweepResult(parent.run_id, name, redact(storage), sweep.ran)
        best = log_summary(parent.run_id, study)
        log_prediction_grid(parent.run_id, study, samples, classes)
        if best is not None:
            result.best_trial, result.best_value = best.number, best.value
            result.best_run_id = best.user_attrs.get(RUN_ATTR)
            if params.registered_model:
                result.model_version = register_best(
                    best, params.registered_model, parent.run_id, name, redact(storage)
                )
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    if not parent.end("FINISHED"):
        sweep.undelivered.append(f"the sweep's run {parent.run_id}: {parent.undelivered()}")
    logger.info(
        "study %s: this worker ran trials %s; best trial %s (%s %s), registered version %s",
        name,
        result.trials_run,
        result.best_trial,
        METRIC,
        result.best_value,
        result.model_version,
    )
    if sweep.undelivered:
        error = TrackingIncompleteError(
            f"study {name} done ({result}) but the tracking server lacks part of it: " + "; ".join(sweep.undelivered)
        )
        error.result = result
        raise error
    return result
