"""Where a run comes from: attach to the run ``mlflow run`` made, create one, or resume one; and the last word on a
training's journal (:func:`sync_journal`).

Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and MLflow has logged the entry point's ``-P`` params;
we attach to that run and never call ``set_experiment``. With plain ``python`` we find or create the experiment by
name on ``mlflow.get_tracking_uri()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from segmentation.config import Config
from segmentation.mlops.connection import check_tracking_server
from segmentation.mlops.journal_file import META_FILE, read_run_meta
from segmentation.mlops.run_guard import (
    RUN_KIND_TAG,
    TRAIN_KIND,
    check_resumable,
    hold_run_lock,
    release_run_lock,
    resume_experiment,
)
from segmentation.mlops.tracker import JOURNAL_DIR, Tracker

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "segmentation"
# With the journal retrying for as long as it takes, a single request need not retry for minutes (MLflow's default:
# 7 retries with exponential backoff): that would only delay noticing that the server is back. Users' values win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def use_journal_http_defaults() -> None:
    """Short per-request HTTP retries for journaled trainings (the journal retries); values already set win."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing; safe when several trainings start at once."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another training created it first


def start_run(
    experiment: str | None = None,
    resume_run_id: str | None = None,
    run_name: str | None = None,
    log_system_metrics: bool = True,
    enabled: bool = True,
    durable: bool = False,
    *,
    train: bool = False,
    resume_config: Config | None = None,
) -> Tracker:
    """Start, attach to or resume an MLflow run.

    Call this on the main process only; other ranks get a disabled :class:`Tracker`.

    Args:
        experiment: experiment name used only when no run is given by ``mlflow run`` (``MLFLOW_RUN_ID``); default
            ``MLFLOW_EXPERIMENT_NAME`` or ``"segmentation"``.
        resume_run_id: continue this existing run (its params stay, new metrics continue its step axis). It is
            checked first (:func:`~segmentation.mlops.run_guard.check_resumable`); a refused run is not touched.
        run_name: name of a newly created run.
        log_system_metrics: sample CPU/memory (and GPU when available) as ``system/*`` metrics.
        enabled: False on non-main processes: nothing is contacted.
        durable: open no fluent active run; the caller calls :meth:`Tracker.open_journal` and logs through the
            journal (training). Otherwise the run becomes MLflow's active run with async logging (evaluation).
        train: the run is a training: it is tagged ``segmentation.run_kind=train`` and holds the run's lock
            until :func:`~segmentation.mlops.run_guard.release_run_lock`, so that nobody resumes it meanwhile.
        resume_config: the config the resume will train with; it must match the run's
            (:data:`~segmentation.mlops.run_guard.RESUME_KEYS`).

    Returns:
        A :class:`Tracker` bound to the run.

    Raises:
        ConnectionError: the tracking server is unreachable.
        ValueError: ``resume_run_id`` does not exist, is not a training of this experiment, was trained with an
            incompatible config, has no checkpoint, or another process holds its lock.
    """
    if not enabled:
        return Tracker(None, enabled=False)
    uri = check_tracking_server()
    client = MlflowClient(uri)
    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        check_resumable(client, resume_run_id, resume_experiment(client, experiment), resume_config)
        run_id = resume_run_id
    elif launcher_run:
        run_id = launcher_run  # attach; set_experiment would break it
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment_id = _get_or_create_experiment(client, name)
        tags = resolve_tags({MLFLOW_RUN_NAME: run_name} if run_name else {})
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id  # RUNNING already
    if train:  # a new run (or one `mlflow run` just made) is known to nobody yet: no race to settle
        hold_run_lock(client, run_id, new=not resume_run_id)
    try:
        if train:
            client.set_tag(run_id, RUN_KIND_TAG, TRAIN_KIND)
        if resume_run_id and launcher_run and launcher_run != resume_run_id:
            # `mlflow run -P resume=<id>` created a run of its own; point it at the run that really continues.
            client.set_tag(launcher_run, "segmentation.resumed_run_id", resume_run_id)
        if durable:
            use_journal_http_defaults()
            if resume_run_id:  # it had ended; new runs and the runs `mlflow run` creates are RUNNING already
                client.update_run(run_id, status="RUNNING")
        else:
            mlflow.config.enable_async_logging(True)
            mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
    except BaseException:
        release_run_lock(run_id)
        raise
    logger.info("MLflow run %s on %s", run_id, uri)
    tracker = Tracker(run_id, tracking_uri=uri)
    tracker.system_metrics = log_system_metrics
    return tracker


@contextlib.contextmanager
def attached_run(run_name: str | None = None, create: bool = True) -> Iterator[str | None]:
    """Yield the id of the active run: the one ``mlflow run`` made (``MLFLOW_RUN_ID``), else a new one if
    ``create``. A run opened here is ended here, FAILED when the block raises."""
    if mlflow.active_run() is not None:
        yield mlflow.active_run().info.run_id
        return
    if not (os.environ.get("MLFLOW_RUN_ID") or create):
        yield None
        return

    tracker = start_run(run_name=run_name, log_system_metrics=False)
    try:
        yield tracker.run_id
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def sync_journal(directory: str | Path, tracking_uri: str | None = None, timeout: float = 600.0) -> Tracker:
    """Deliver what a training left in its journal (server down at the end of the run, or a killed process).

    Args:
        directory: the journal folder (``<output_dir>/<run_id>/tracking``) or the run's output folder.
        tracking_uri: server to send to; default: the one the training used (recorded in the journal).
        timeout: seconds to keep trying.

    Returns:
        The tracker; ``tracker.undelivered()`` is None when everything arrived.

    Raises:
        FileNotFoundError: ``directory`` holds no journal.
        JournalError: the journal folder is unusable (corrupt ``run.json`` or cursor); the message names the file.
    """
    directory = Path(directory)
    if not (directory / META_FILE).is_file() and (directory / JOURNAL_DIR / META_FILE).is_file():
        directory = directory / JOURNAL_DIR
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(
            f"no tracking journal in {directory} (expected {META_FILE}); pass the "
            f"'{JOURNAL_DIR}' folder of a training output, <output_dir>/<run_id>/{JOURNAL_DIR}"
        )
    meta = read_run_meta(directory)
    tracking_uri = tracking_uri or meta["tracking_uri"]
    mlflow.set_tracking_uri(tracking_uri)  # the model record logs through MLflow's fluent API
    use_journal_http_defaults()
    tracker = Tracker(meta["run_id"], tracking_uri=tracking_uri)
    tracker.open_journal(directory, system_metrics_interval=0, metrics_interval=0)
    tracker.journal.close(timeout)
    return tracker
