"""Every MLflow call made during training, behind a small :class:`Tracker` used by the main process only.

Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and MLflow has logged the entry point's ``-P``
params; we attach to that run and never call ``set_experiment``. With plain ``python`` we find or create the
experiment by name on ``mlflow.get_tracking_uri()``. The resolved config goes under the ``cfg.`` prefix so it can
never clash with an MLproject param.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from segmentation.config import Config, flatten, to_yaml

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "segmentation"
CONFIG_PARAM_PREFIX = "cfg."
CONFIG_ARTIFACT = "config/resolved.yaml"
MAX_PARAM_CHARS = 6000  # the server silently truncates longer values


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


class Tracker:
    """The active MLflow run as seen by the training loop; every method is a no-op when ``enabled`` is False."""

    def __init__(self, run_id: str | None, enabled: bool = True) -> None:
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self._logged_steps: dict[str, int] = {}  # on resume: the last step already on the server, per metric

    @property
    def client(self) -> MlflowClient:
        return MlflowClient()

    def log_config(self, cfg: Config) -> None:
        """Log the resolved config as ``cfg.*`` params (batched) and as ``config/resolved.yaml``."""
        if not self.enabled:
            return
        existing = self.client.get_run(self.run_id).data.params
        flat = flatten(cfg, CONFIG_PARAM_PREFIX)
        resumed = any(key in existing for key in flat)
        # A resumed run already holds these params, and MLflow refuses to change a logged value.
        params = {k: str(v)[:MAX_PARAM_CHARS] for k, v in flat.items() if k not in existing}
        if params:
            mlflow.log_params(params, synchronous=True)
        self.log_text(to_yaml(cfg), "config/resolved-resume.yaml" if resumed else CONFIG_ARTIFACT)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params that are not on the run yet (never re-log a key, e.g. one MLflow logged from ``-P``)."""
        if not self.enabled:
            return
        existing = self.client.get_run(self.run_id).data.params
        new = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items() if k not in existing}
        if new:
            mlflow.log_params(new, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def skip_logged_steps(self) -> None:
        """After a resume, remember which steps each metric already has so that none is logged twice."""
        if not self.enabled:
            return
        for key in self.client.get_run(self.run_id).data.metrics:
            if not key.startswith("system/"):
                history = self.client.get_metric_history(self.run_id, key)
                self._logged_steps[key] = max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (asynchronously). A non-numeric value raises instead of vanishing.

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
        if values:
            mlflow.log_metrics(values, step=step)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """A step-indexed image (H x W x 3 uint8 RGB): the UI shows a slider over steps."""
        if self.enabled and step > self._logged_steps.get(key, -1):
            mlflow.log_image(image, key=key, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            mlflow.log_text(text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.enabled:
            mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            mlflow.log_artifact(str(local_path), artifact_path)

    def list_artifacts(self, path: str) -> list[str]:
        """Paths of the run's artifacts directly under ``path`` (empty when there are none)."""
        if not self.enabled:
            return []
        return [f.path for f in self.client.list_artifacts(self.run_id, path)]

    def download_artifacts(self, path: str, dst_dir: str | Path) -> Path:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=path,
                                                        dst_path=str(dst_dir)))

    def delete_artifacts(self, path: str) -> None:
        """Remove run artifacts (pruned checkpoints); stores that cannot delete keep them, with a warning."""
        if not self.enabled:
            return
        from mlflow.tracking.artifact_utils import get_artifact_repository

        try:
            get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri).delete_artifacts(path)
        except (MlflowException, NotImplementedError, OSError) as exc:
            logger.warning("could not delete artifact %s of run %s: %s", path, self.run_id, exc)

    def log_dataset(self, table: Any, source: str, name: str, context: str) -> None:
        """Record the split table as a run input (MLflow dataset with a digest)."""
        if self.enabled:
            dataset = mlflow.data.from_pandas(table, source=source, name=name)
            mlflow.log_input(dataset, context=context)

    @property
    def dataset_digest(self) -> str | None:
        """Digest of the first dataset logged as an input of the run (also after a resume)."""
        if not self.enabled:
            return None
        inputs = self.client.get_run(self.run_id).inputs
        datasets = inputs.dataset_inputs if inputs is not None else []
        return datasets[0].dataset.digest if datasets else None

    def tag_model_version(self, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        """Flush queued async writes, then close the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if not self.enabled:
            return
        try:
            mlflow.flush_async_logging()
        finally:
            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)


def start_run(experiment: str | None = None, resume_run_id: str | None = None, run_name: str | None = None,
              log_system_metrics: bool = True, enabled: bool = True) -> Tracker:
    """Start, attach to or resume the MLflow run of this training, with async logging on.

    Call this on the main process only; other ranks get a disabled :class:`Tracker`.

    Args:
        experiment: experiment name used only when no run is given by ``mlflow run`` (``MLFLOW_RUN_ID``); default
            ``MLFLOW_EXPERIMENT_NAME`` or ``"segmentation"``.
        resume_run_id: continue this existing run (its params stay, new metrics continue its step axis).
        run_name: name of a newly created run.
        log_system_metrics: sample CPU/memory (and GPU when available) as ``system/*`` metrics.
        enabled: False on non-main processes: nothing is contacted.

    Returns:
        A :class:`Tracker` bound to the active run.

    Raises:
        ConnectionError: the tracking server is unreachable.
        ValueError: ``resume_run_id`` does not exist on the tracking server.
    """
    if not enabled:
        return Tracker(None, enabled=False)
    uri = check_tracking_server()
    mlflow.config.enable_async_logging(True)
    if resume_run_id:
        try:
            MlflowClient().get_run(resume_run_id)
        except MlflowException:
            raise ValueError(f"cannot resume: run id {resume_run_id!r} does not exist on tracking server {uri}") \
                from None
        launcher_run = os.environ.get("MLFLOW_RUN_ID")
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=log_system_metrics)
        if launcher_run and launcher_run != resume_run_id:
            # `mlflow run -P resume=<id>` created a run of its own; point it at the run that really continues.
            MlflowClient().set_tag(launcher_run, "segmentation.resumed_run_id", resume_run_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run(log_system_metrics=log_system_metrics)  # attach; set_experiment would break it
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        client = MlflowClient()
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, log_system_metrics=log_system_metrics)
    logger.info("MLflow run %s on %s", run.info.run_id, uri)
    return Tracker(run.info.run_id)

