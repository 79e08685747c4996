"""Every MLflow call made during training, behind a small :class:`Tracker` used by the main process only.

Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and MLflow has logged the entry point's ``-P``
params; we attach to that run and never call ``set_experiment``. With plain ``python`` we find or create the
experiment by name on ``mlflow.get_tracking_uri()``. The resolved config goes under the ``cfg.`` prefix so it can
never clash with an MLproject param.

Training opens its tracker ``durable``: after the start-up calls (params, config, dataset), every write goes through
a local :class:`segmentation.spool.Journal` under ``<output_dir>/<run_id>/tracking/`` that a background thread
delivers, so a tracking-server outage neither stops nor slows training and loses nothing. Other callers (evaluation)
get MLflow's fluent active run with async logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import mlflow
import mlflow.data
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NAME

from segmentation.config import Config, flatten, to_yaml
from segmentation.io import write_text_atomic
from segmentation.spool import Journal

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "segmentation"
CONFIG_PARAM_PREFIX = "cfg."
CONFIG_ARTIFACT = "config/resolved.yaml"
MAX_PARAM_CHARS = 6000  # the server silently truncates longer values
JOURNAL_DIR = "tracking"  # beside checkpoints/ in <output_dir>/<run_id>/
META_FILE = "run.json"
SYNC_COMMAND = "python -m entrypoints.sync_tracking"
# Metric records logged within this many seconds travel in one request (see segmentation.spool): the server and the
# sender then cost a training that logs every step a request every 2 s rather than one per step.
METRICS_INTERVAL_S = 2.0
# With the journal retrying for as long as it takes, a single request need not retry for minutes (MLflow's default:
# 7 retries with exponential backoff): that would only delay noticing that the server is back. Users' values win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "UNAUTHENTICATED",
                    "PERMISSION_DENIED", "ENDPOINT_NOT_FOUND"}


class TrackingIncompleteError(RuntimeError):
    """Training finished but part of its tracking data is still only in the local journal."""


def check_tracking_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast when an HTTP tracking server does not answer; local stores (sqlite, file) always pass.

    Returns:
        The tracking URI that was checked.

    Raises:
        ConnectionError: the server at ``uri`` refused the connection or timed out.
    """
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (e.g. 401 behind basic-auth): it is reachable
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}). Start it "
            f"(`mlflow server --host 127.0.0.1 --port ...`) or point MLFLOW_TRACKING_URI at a running one; "
            f"nothing was trained."
        ) from None
    return uri



def is_transient(exc: BaseException) -> bool:
    """Whether a failed tracking write may succeed later (server down, 5xx, auth to fix) rather than never."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or exc.get_http_status_code() >= 500
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


def _send_model(client: MlflowClient, run_id: str, record: dict) -> str | None:
    """Log a saved model package as the run's model (and register it); returns the new version, if any."""
    from segmentation.export import load_model_package, log_pytorch_model, read_package_meta

    model, classes = load_model_package(record["package"])
    meta = read_package_meta(record["package"])
    model_cfg = SimpleNamespace(arch=meta["arch"], num_classes=int(meta["num_classes"]))
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):  # log_model needs an active run
        info = log_pytorch_model(model, classes, model_cfg, name=record["name"],
                                 registered_model_name=record.get("registered_model"), step=record["step"])
    version = getattr(info, "registered_model_version", None)
    if version is not None:
        for key, value in record.get("version_tags", {}).items():
            client.set_model_version_tag(record["registered_model"], str(version), key, str(value))
    return None if version is None else str(version)


class Tracker:
    """The training's MLflow run; every method is a no-op when ``enabled`` is False (non-main ranks).

    Start-up writes (params, config, dataset, tags) go straight to the server. After :meth:`open_journal`, metrics,
    images, checkpoint uploads, the model and the final status go through the journal instead (without a journal
    they are sent synchronously).
    """

    def __init__(self, run_id: str | None, enabled: bool = True, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.journal: Journal | None = None
        self._journal_dir: Path | None = None
        self.model_version: str | None = None
        self._logged_steps: dict[str, int] = {}  # last step of each metric already logged (server or journal)
        self._digest: str | None = None
        self._sampler: threading.Thread | None = None
        self._stop_sampler = threading.Event()
        self.system_metrics = True

    # -- start-up (synchronous) ------------------------------------------------------------------------------------
    def log_config(self, cfg: Config) -> None:
        """Log the resolved config as ``cfg.*`` params (batched) and as ``config/resolved.yaml``."""
        if not self.enabled:
            return
        existing = self.client.get_run(self.run_id).data.params
        flat = flatten(cfg, CONFIG_PARAM_PREFIX)
        resumed = any(key in existing for key in flat)
        self.log_params(flat, existing)  # a resumed run already holds them: MLflow refuses to change a value
        self.client.log_text(self.run_id, to_yaml(cfg), "config/resolved-resume.yaml" if resumed else CONFIG_ARTIFACT)

    def log_params(self, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> None:
        """Log params that are not on the run yet (never re-log a key, e.g. one MLflow logged from ``-P``).

        ``existing``: the run's params when the caller has just read them (saves a request).
        """
        if not self.enabled:
            return
        if existing is None:
            existing = self.client.get_run(self.run_id).data.params
        new = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items() if k not in existing}
        items = [mlflow.entities.Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self.client.log_batch(self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, table: Any, source: str, name: str, context: str) -> None:
        """Record the split table as a run input (MLflow dataset with a digest)."""
        if self.enabled:
            dataset = mlflow.data.from_pandas(table, source=source, name=name)
            self._digest = dataset.digest
            inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
            for attempt in range(3):
                try:
                    self.client.log_inputs(self.run_id, inputs)
                    return
                except MlflowException as exc:
                    # The server inserts a new dataset row after checking that none exists; when several trainings
                    # of one experiment start together, the losers hit the unique constraint (sqlite and
                    # PostgreSQL). The row exists by then, so the retry links it to this run.
                    duplicate = "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc)
                    if not duplicate or attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))

    @property
    def dataset_digest(self) -> str | None:
        """Digest of the first dataset logged as an input of the run (also after a resume)."""
        if not self.enabled or self._digest is not None:
            return self._digest
        inputs = self.client.get_run(self.run_id).inputs
        datasets = inputs.dataset_inputs if inputs is not None else []
        self._digest = datasets[0].dataset.digest if datasets else None
        return self._digest

    def skip_logged_steps(self) -> None:
        """After a resume, remember which steps each metric already has so that none is logged twice."""
        if not self.enabled:
            return
        for key in self.client.get_run(self.run_id).data.metrics:
            history = self.client.get_metric_history(self.run_id, key)
            last = max((m.step for m in history), default=-1)
            self._logged_steps[key] = max(self._logged_steps.get(key, -1), last)

    def list_artifacts(self, path: str) -> list[str]:
        """Paths of the run's artifacts directly under ``path`` (empty when there are none)."""
        return [f.path for f in self.client.list_artifacts(self.run_id, path)] if self.enabled else []

    def download_artifacts(self, path: str, dst_dir: str | Path) -> Path:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, path, str(dst_dir)))

    # -- during training (journaled) -------------------------------------------------------------------------------
    def open_journal(self, directory: str | Path, system_metrics_interval: float = 10.0,
                     metrics_interval: float = METRICS_INTERVAL_S) -> None:
        """Route every later write through a journal in ``directory`` (reopened as is after a kill or a resume).

        Args:
            directory: the journal folder (``<output_dir>/<run_id>/tracking``).
            system_metrics_interval: seconds between two ``system/*`` samples; 0 turns sampling off.
            metrics_interval: seconds during which metric records are gathered into one request.
        """
        if not self.enabled:
            return
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"run_id": self.run_id, "tracking_uri": self.tracking_uri}
        write_text_atomic(directory / META_FILE, json.dumps(meta))
        self._journal_dir = directory  # before the Journal: its thread may send a backlog at once
        self.journal = Journal(directory, self._send, is_transient, min_interval_s=metrics_interval)
        for record in self.journal.records:
            if record["kind"] in ("metrics", "image"):
                for key in record["values"] if record["kind"] == "metrics" else [record["key"]]:
                    self._logged_steps[key] = max(self._logged_steps.get(key, -1), record["step"])
        if system_metrics_interval > 0 and self.system_metrics:
            self._sampler = threading.Thread(target=self._sample_system, args=(system_metrics_interval,),
                                             name="system-metrics", daemon=True)
            self._sampler.start()

    def _write(self, record: dict) -> None:
        if self.journal is None:  # no journal (a tool, not a training): write synchronously
            self._send([record])
        else:
            self.journal.append(record)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step``. A non-numeric value raises instead of vanishing.

        Raises:
            TypeError: a value is not a real number.
        """
        if not self.enabled:
            return
        values = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")
            if step > self._logged_steps.get(key, -1):
                values[key] = float(value)
                self._logged_steps[key] = step
        if values:
            self._write({"kind": "metrics", "step": step, "timestamp": int(time.time() * 1000), "values": values})

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """A step-indexed image (H x W x 3 uint8 RGB): the UI shows a slider over steps."""
        if not self.enabled or step <= self._logged_steps.get(key, -1):
            return
        if self.journal is None:
            self.client.log_image(self.run_id, image, key=key, step=step)
            return
        path = self.journal.directory / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}-{step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))
        self._logged_steps[key] = step
        self._write({"kind": "image", "key": key, "step": step, "timestamp": int(time.time() * 1000),
                     "file": str(path.relative_to(self.journal.directory))})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str, last: str | None = None) -> None:
        """Upload a folder in the background, file ``last`` after all others (skipped if the folder is gone)."""
        if self.enabled:
            self._write({"kind": "artifacts", "local": str(Path(local_dir).resolve()), "path": artifact_path,
                         "last": last})

    def delete_artifacts(self, path: str) -> None:
        """Remove run artifacts (pruned checkpoints), after the uploads queued before."""
        if self.enabled:
            self._write({"kind": "delete", "path": path})

    def log_model(self, package: str | Path, step: int, registered_model: str | None,
                  version_tags: Mapping[str, Any]) -> None:
        """Log a saved model package as the run's model ``model`` (and register a version), in the background."""
        if self.enabled:
            self._write({"kind": "model", "package": str(Path(package).resolve()), "name": "model", "step": step,
                         "registered_model": registered_model, "version_tags": dict(version_tags)})

    def end(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """Queue the final status and wait up to ``timeout`` s for the journal to reach the server.

        Returns:
            True when everything was delivered and accepted; undelivered records stay in the journal for
            :data:`SYNC_COMMAND`, rejected ones are listed in its ``rejected.jsonl``.
        """
        if not self.enabled:
            return True
        if self.journal is None:  # started but never journaled (evaluation, or a failure during start-up)
            with contextlib.suppress(Exception):
                mlflow.flush_async_logging()
            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
            else:
                self.client.set_terminated(self.run_id, status)
            return True
        self._stop_sampler.set()
        self._write({"kind": "end", "status": status, "timestamp": int(time.time() * 1000)})
        delivered = self.journal.close(timeout) and not self.journal.rejected
        if self.journal.pending:
            logger.error("tracking server %s unreachable (%s): %d record(s) of run %s kept in %s; upload them "
                         "with `%s %s`", self.tracking_uri, self.journal.last_error, self.journal.pending,
                         self.run_id, self.journal.directory, SYNC_COMMAND, self.journal.directory)
        return delivered

    # -- delivery (journal thread) ---------------------------------------------------------------------------------
    def _send(self, batch: list[dict]) -> None:
        first = batch[0]
        kind = first["kind"]
        if kind == "metrics":
            metrics = [Metric(k, v, r["timestamp"], r["step"]) for r in batch for k, v in r["values"].items()]
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif kind == "image":
            image = cv2.imread(str(self._journal_dir / first["file"]), cv2.IMREAD_COLOR)[..., ::-1]
            self.client.log_image(self.run_id, np.ascontiguousarray(image), key=first["key"], step=first["step"],
                                  timestamp=first["timestamp"], synchronous=True)
        elif kind == "artifacts":  # a folder pruned before its turn has nothing left to upload
            local = Path(first["local"])
            files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
            # The marker file goes last: a reader that finds it on the server finds the rest too.
            for file in sorted(files, key=lambda f: f.name == first.get("last")):
                parent = file.parent.relative_to(local).as_posix()
                target = first["path"] if parent == "." else f"{first['path']}/{parent}"
                self.client.log_artifact(self.run_id, str(file), target)
        elif kind == "delete":
            from mlflow.tracking.artifact_utils import get_artifact_repository

            repo = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
            try:
                repo.delete_artifacts(first["path"])
            except (NotImplementedError, FileNotFoundError) as exc:
                logger.warning("could not delete artifact %s of run %s: %s", first["path"], self.run_id, exc)
        elif kind == "model":
            self.model_version = _send_model(self.client, self.run_id, first)
        elif kind == "end":
            self.client.set_terminated(self.run_id, first["status"], end_time=first["timestamp"])
        else:
            raise ValueError(f"unknown journal record kind {kind!r}")

    def _sample_system(self, interval: float) -> None:
        """CPU/memory (and GPU) as ``system/*`` metrics, through the journal like everything else."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval)
        step = self._logged_steps.get("system/cpu_utilization_percentage", -1) + 1
        while not self._stop_sampler.wait(interval):
            monitor.collect_metrics()
            metrics = {f"system/{k}": v for k, v in monitor.aggregate_metrics().items()}
            for m in monitor.monitors:
                m.clear_metrics()
            if metrics and not self._stop_sampler.is_set():
                self.log_metrics(metrics, step)
                step += 1


def sync_journal(directory: str | Path, tracking_uri: str | None = None, timeout: float = 600.0) -> Tracker:
    """Deliver what a training left in its journal (server down at the end of the run, or a killed process).

    Args:
        directory: the journal folder (``<output_dir>/<run_id>/tracking``) or the run's output folder.
        tracking_uri: server to send to; default: the one the training used (recorded in the journal).
        timeout: seconds to keep trying.

    Returns:
        The tracker; ``tracker.journal.pending`` is 0 when everything arrived.

    Raises:
        FileNotFoundError: ``directory`` holds no journal.
    """
    directory = Path(directory)
    if not (directory / META_FILE).is_file() and (directory / JOURNAL_DIR / META_FILE).is_file():
        directory = directory / JOURNAL_DIR
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(f"no tracking journal in {directory} (expected {META_FILE}); pass the "
                                f"'{JOURNAL_DIR}' folder of a training output, <output_dir>/<run_id>/{JOURNAL_DIR}")
    meta = json.loads((directory / META_FILE).read_text())
    tracking_uri = tracking_uri or meta["tracking_uri"]
    mlflow.set_tracking_uri(tracking_uri)  # the model record logs through MLflow's fluent API
    tracker = Tracker(meta["run_id"], tracking_uri=tracking_uri)
    tracker.open_journal(directory, system_metrics_interval=0, metrics_interval=0)
    tracker.journal.close(timeout)
    return tracker


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


def start_run(experiment: str | None = None, resume_run_id: str | None = None, run_name: str | None = None,
              log_system_metrics: bool = True, enabled: bool = True, durable: bool = False) -> Tracker:
    """Start, attach to or resume the MLflow run of this training.

    Call this on the main process only; other ranks get a disabled :class:`Tracker`.

    Args:
        experiment: experiment name used only when no run is given by ``mlflow run`` (``MLFLOW_RUN_ID``); default
            ``MLFLOW_EXPERIMENT_NAME`` or ``"segmentation"``.
        resume_run_id: continue this existing run (its params stay, new metrics continue its step axis).
        run_name: name of a newly created run.
        log_system_metrics: sample CPU/memory (and GPU when available) as ``system/*`` metrics.
        enabled: False on non-main processes: nothing is contacted.
        durable: open no fluent active run; the caller calls :meth:`Tracker.open_journal` and logs through the
            journal (training). Otherwise the run becomes MLflow's active run with async logging (evaluation).

    Returns:
        A :class:`Tracker` bound to the run.

    Raises:
        ConnectionError: the tracking server is unreachable.
        ValueError: ``resume_run_id`` does not exist on the tracking server.
    """
    if not enabled:
        return Tracker(None, enabled=False)
    uri = check_tracking_server()
    client = MlflowClient(uri)
    launcher_run = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        try:
            client.get_run(resume_run_id)
        except MlflowException:
            raise ValueError(f"cannot resume: run id {resume_run_id!r} does not exist on tracking server {uri}") \
                from None
        if launcher_run and launcher_run != resume_run_id:
            # `mlflow run -P resume=<id>` created a run of its own; point it at the run that really continues.
            client.set_tag(launcher_run, "segmentation.resumed_run_id", resume_run_id)
        run_id = resume_run_id
    elif launcher_run:
        run_id = launcher_run  # attach; set_experiment would break it
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment_id = _get_or_create_experiment(client, name)
        tags = resolve_tags({MLFLOW_RUN_NAME: run_name} if run_name else {})
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id  # RUNNING already
    if durable:
        if resume_run_id:  # it had ended; new runs and the runs `mlflow run` creates are RUNNING already
            client.update_run(run_id, status="RUNNING")
    else:
        mlflow.config.enable_async_logging(True)
        mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
    logger.info("MLflow run %s on %s", run_id, uri)
    tracker = Tracker(run_id, tracking_uri=uri)
    tracker.system_metrics = log_system_metrics
    return tracker
