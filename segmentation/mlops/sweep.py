"""Optuna studies whose trials are MLflow child runs: the study and its storage, one child run per trial, the
pruning hook handed to :func:`~segmentation.training.engine.fit`, and the clean-up of trials whose worker died.

Several workers (processes, machines) share one study through Optuna's RDB storage (sqlite on one machine,
PostgreSQL for a team): the storage hands out trial numbers, so no trial runs twice. Every running trial records a
heartbeat; a trial whose worker stopped beating for ``grace_period`` seconds (SIGKILL, a lost machine) is set to FAIL
by the next worker that starts a trial or checks the study, and :class:`CloseLostTrialRun` then ends its MLflow
run (FAILED, ``sweep.state=failed``) and the dead worker's parent run if it is still RUNNING.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy.event
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from segmentation.mlops.runs import use_journal_http_defaults
from segmentation.mlops.tracker import Tracker
from segmentation.training.checkpoint import ARTIFACT_DIR
from segmentation.training.search_space import SearchSpace

logger = logging.getLogger(__name__)

METRIC = "val/mIoU"  # what a trial reports and maximises (its best validation, the checkpoint that is logged)
STATE_TAG = "sweep.state"  # on a trial's run: running, complete, pruned, failed
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial"
FAILURE_TAG = "sweep.failure"
WORKER_TAG = "sweep.worker"  # on a worker's parent run: host:pid
# Trial user attributes: where each trial is tracked, and why it failed when the trial itself failed it.
RUN_ATTR, PARENT_ATTR, WORKER_ATTR, FAILURE_ATTR = "mlflow_run_id", "mlflow_parent_run_id", "worker", "failure"
STORAGE_FORMS = "sqlite:///path/optuna.db, postgresql+psycopg2://user@host:5432/db"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside a ``sqlite:///`` tracking store, else ``sqlite:///optuna.db`` in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).with_name('optuna.db')}"
    return "sqlite:///optuna.db"


def redact(storage: str) -> str:
    """The storage URL without its password, fit for params, tags and logs."""
    try:
        return make_url(storage).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return storage.split("@")[-1]


def _storage(url: str, heartbeat_interval: int, grace_period: int, tracking_uri: str) -> optuna.storages.RDBStorage:
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ValueError(f"storage {url!r} is not a database URL; expected e.g. {STORAGE_FORMS}") from None
    # sqlite: wait for the other workers' writes rather than failing at once, and leave transactions to SQLAlchemy
    # (see _begin_immediate); servers: drop dead pooled connections.
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {"pool_pre_ping": True}
    failure: Exception | None = None
    for attempt in range(5):
        if attempt:
            time.sleep(0.5 * attempt)
        try:
            with warnings.catch_warnings():  # heartbeat_interval is marked experimental; it is what we rely on
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=CloseLostTrialRun(tracking_uri),
                )
            if sqlite:
                _begin_immediate(rdb.engine)
            return rdb
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            failure = exc  # workers starting together race to create the tables; the loser finds them next time
        except sqlalchemy.exc.OperationalError as exc:
            if "already exists" not in str(exc):
                first = str(exc.orig if exc.orig is not None else exc).strip().splitlines()[0]
                raise ConnectionError(f"Optuna storage {redact(url)} is not reachable: {first}") from None
            failure = exc
        except ImportError as exc:
            raise ValueError(f"storage {redact(url)}: its database driver is not installed ({exc})") from None
    raise ValueError(f"storage {redact(url)}: could not create Optuna's tables: {failure}")


def _begin_immediate(engine: sqlalchemy.engine.Engine) -> None:
    """Make every transaction on a sqlite storage (after its set-up) take the database's write lock when it begins.

    Optuna claims a waiting trial (an enqueued one, or one a dead worker left) by reading its state and writing
    RUNNING in one transaction, relying on ``SELECT ... FOR UPDATE``, which sqlite ignores: two workers could both
    read WAITING, both run the trial, and the second to finish failed with "Cannot tell a COMPLETE trial". Under
    ``BEGIN IMMEDIATE`` the second worker waits for the first one's commit and then reads RUNNING. Reads queue
    behind writes too (up to the 60 s busy timeout); a sweep's few workers do not notice.
    """

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_study(
    name: str, storage: str, space: SearchSpace, heartbeat_interval: int, grace_period: int, tracking_uri: str
) -> optuna.Study:
    """Create the study, or load it when another worker (or an earlier sweep) made it.

    Raises:
        ValueError: a malformed storage URL, a missing driver, or an existing study that minimises.
        ConnectionError: the database does not answer.
    """
    rdb = _storage(storage, heartbeat_interval, grace_period, tracking_uri)
    # Median pruning suits trials that validate only a few times with noisy scores: it compares a trial with the
    # median of the completed trials at the same step, needs no rung schedule (Hyperband/ASHA would want many
    # validations per trial), waits for n_startup_trials complete trials so there is a reference, and
    # n_warmup_steps keeps the first, noisiest validations from condemning a trial.
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=space.pruner.n_startup_trials, n_warmup_steps=space.pruner.n_warmup_steps
    )
    # constant_liar: trials still running count as bad guesses, so parallel workers do not sample the same point.
    sampler = optuna.samplers.TPESampler(constant_liar=True)
    study = optuna.create_study(
        study_name=name, storage=rdb, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ValueError(f"study {name!r} in {redact(storage)} minimises; a sweep maximises {METRIC}: pick a new name")
    return study


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's value of every searched key (an enqueued trial gets its enqueued values)."""
    values: dict[str, Any] = {}
    for dist in space.params:
        if dist.type == "float":
            values[dist.key] = trial.suggest_float(dist.key, dist.low, dist.high, log=dist.log, step=dist.step)
        elif dist.type == "int":
            values[dist.key] = trial.suggest_int(dist.key, dist.low, dist.high, log=dist.log, step=dist.step or 1)
        else:
            values[dist.key] = trial.suggest_categorical(dist.key, list(dist.choices))
    return values


class PruningReporter:
    """``fit``'s ``on_validation`` hook: report ``val/mIoU`` to the trial and stop when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.values: dict[int, float] = {}
        self.pruned_at: int | None = None

    def __call__(self, step: int, metrics: Mapping[str, float]) -> bool:
        value = float(metrics.get(METRIC, math.nan))
        self.values[step] = value
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False

    @property
    def best(self) -> float:
        finite = [v for v in self.values.values() if math.isfinite(v)]
        return max(finite) if finite else math.nan

    @property
    def best_step(self) -> int | None:
        finite = {s: v for s, v in self.values.items() if math.isfinite(v)}
        return max(finite, key=finite.get) if finite else None


class TrialTracker(Tracker):
    """A trial's run: everything a training logs except the checkpoint mirror. A trial is never resumed (a failed
    one is replaced), so uploading its checkpoints would only fill the artifact store; its best weights are logged
    as the run's model."""

    def log_artifacts(self, local_dir: str | Path, artifact_path: str, last: str | None = None) -> None:
        if not artifact_path.startswith(f"{ARTIFACT_DIR}/"):
            super().log_artifacts(local_dir, artifact_path, last)

    def delete_artifacts(self, path: str) -> None:
        if not path.startswith(f"{ARTIFACT_DIR}/"):
            super().delete_artifacts(path)


def start_trial_run(trial: optuna.Trial, parent_run_id: str, study_name: str) -> TrialTracker:
    """Create the trial's MLflow run under the sweep's parent run (same experiment), named ``trial-<number>``."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    name = f"trial-{trial.number}"
    tags = {
        MLFLOW_RUN_NAME: name,
        MLFLOW_PARENT_RUN_ID: parent_run_id,
        STUDY_TAG: study_name,
        TRIAL_TAG: str(trial.number),
        STATE_TAG: "running",
    }
    run = client.create_run(parent.info.experiment_id, run_name=name, tags=resolve_tags(tags))
    trial.set_user_attr(RUN_ATTR, run.info.run_id)
    trial.set_user_attr(PARENT_ATTR, parent_run_id)
    trial.set_user_attr(WORKER_ATTR, worker_name())
    use_journal_http_defaults()
    return TrialTracker(run.info.run_id, tracking_uri=mlflow.get_tracking_uri())


def finish_trial_run(run_id: str, state: str, status: str | None = None, reason: str | None = None) -> None:
    """Tag the trial's run with its outcome and, when ``status`` is given, set its MLflow status."""
    client = MlflowClient()
    client.set_tag(run_id, STATE_TAG, state)
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    if status:
        client.set_terminated(run_id, status)


class CloseLostTrialRun:
    """Optuna's heartbeat-stale callback: the trial's worker died, so end its MLflow run (and the worker's parent
    run, if still RUNNING) as FAILED. It runs in whichever worker noticed, possibly on another machine."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        worker = trial.user_attrs.get(WORKER_ATTR, "?")
        logger.warning("trial %d of worker %s stopped beating: marked FAIL", trial.number, worker)
        if not run_id:
            return
        client = MlflowClient(self.tracking_uri)
        reason = f"worker {worker} lost: no heartbeat within the grace period"
        try:
            client.log_batch(run_id, tags=[RunTag(STATE_TAG, "failed"), RunTag(FAILURE_TAG, reason)])
            client.set_terminated(run_id, "FAILED")
            parent = trial.user_attrs.get(PARENT_ATTR)
            if parent and client.get_run(parent).info.status == "RUNNING":
                client.set_tag(parent, FAILURE_TAG, f"{reason} (trial {trial.number})")
                client.set_terminated(parent, "FAILED")
        except MlflowException as exc:  # the study goes on; the run stays as it was
            logger.warning("could not close run %s of lost trial %d: %s", run_id, trial.number, exc)


def fail_lost_trials(study: optuna.Study) -> None:
    """Set RUNNING trials without a recent heartbeat to FAIL now (and close their runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def progress(study: optuna.Study) -> tuple[int, int]:
    """``(finished, running)`` trials. Finished: complete, pruned, or failed by the trial itself (a diverging
    loss); a trial failed because its worker died does not count, so another worker replaces it."""
    finished = running = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
            trial.state == TrialState.FAIL and FAILURE_ATTR in trial.user_attrs
        ):
            finished += 1
        elif trial.state == TrialState.RUNNING:
            running += 1
    return finished, running
