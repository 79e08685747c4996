"""The synchronous half of the training's run: what start-up writes straight to the server and what a resume reads.

Start-up writes are the resolved config (``cfg.*`` params, batched and length-capped, and ``config/resolved.yaml``),
tags and the datasets (run inputs with a digest); a resume reads back the last step of each metric, so that none is
logged twice, and the checkpoints uploaded as artifacts. The resolved config goes under the ``cfg.`` prefix so it can
never clash with an MLproject param. :class:`~segmentation.mlops.tracker.Tracker` adds what training writes through
its journal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from segmentation.config import Config, flatten, to_yaml

CONFIG_PARAM_PREFIX = "cfg."
CONFIG_ARTIFACT = "config/resolved.yaml"
MAX_PARAM_CHARS = 6000  # the server silently truncates longer values
RESUMED_TAG_PREFIX = "resume."  # + "cfg.train.lr": a config value a resume changed (params never change)


def config_difference(params: Mapping[str, str], cfg: Config) -> str | None:
    """How a run's ``cfg.*`` params differ from ``cfg`` (the first key that does), or None when they are equal."""
    for key, value in flatten(cfg, CONFIG_PARAM_PREFIX).items():
        if params.get(key) != str(value)[:MAX_PARAM_CHARS]:
            return f"its {key} is {params.get(key)!r}, the config now gives {str(value)[:200]!r}"
    return None


class RunSetup:
    """The run's start-up writes and resume reads, sent synchronously; every method is a no-op when ``enabled`` is
    False (non-main ranks)."""

    def __init__(self, run_id: str | None, enabled: bool = True, tracking_uri: str | None = None) -> None:
        self.run_id = run_id
        self.enabled = enabled and run_id is not None
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self._logged_steps: dict[str, int] = {}  # last step of each metric already logged (server or journal)
        self._digest: str | None = None

    def log_config(self, cfg: Config) -> None:
        """Log the resolved config as ``cfg.*`` params (batched) and as ``config/resolved.yaml``.

        A resumed run already holds its params, and MLflow never changes one: a value the resume changed (a new
        ``train.lr``, more epochs) is recorded as the tag ``resume.cfg.<key>`` (the value in use from then on,
        :data:`RESUMED_TAG_PREFIX`), and each resume's whole config as ``config/resolved-resume-<time>.yaml``.
        """
        if not self.enabled:
            return
        run = self.client.get_run(self.run_id)
        existing, tags = run.data.params, run.data.tags
        flat = {key: str(value)[:MAX_PARAM_CHARS] for key, value in flatten(cfg, CONFIG_PARAM_PREFIX).items()}
        resumed = any(key in existing for key in flat)
        self.log_params(flat, existing)
        if not resumed:
            self.client.log_text(self.run_id, to_yaml(cfg), CONFIG_ARTIFACT)
            return
        # The value in use now, for every key a resume changed, this one or an earlier one (which may have changed
        # it back to the param's value).
        in_use = {
            RESUMED_TAG_PREFIX + key: value
            for key, value in flat.items()
            if key in existing and (existing[key] != value or RESUMED_TAG_PREFIX + key in tags)
        }
        if in_use:
            self.set_tags(in_use)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}Z"
        self.client.log_text(self.run_id, to_yaml(cfg), f"config/resolved-resume-{stamp}.yaml")

    def log_params(self, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> None:
        """Log params that are not on the run yet (never re-log a key, e.g. one MLflow logged from ``-P``).

        ``existing``: the run's params when the caller has just read them (saves a request).
        """
        if not self.enabled:
            return
        if existing is None:
            existing = self.client.get_run(self.run_id).data.params
        new = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items() if k not in existing}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_dataset(self, table: Any, source: str, name: str, context: str, log: bool = True) -> tuple[str, str]:
        """Record a table of samples as a run input (an MLflow dataset with a digest); returns ``(name, digest)``.

        ``log=False`` only computes the reference (a resumed run has its inputs already). The ``training`` dataset's
        digest becomes :attr:`dataset_digest`; metrics logged with ``dataset=(name, digest)`` are linked to it.
        """
        dataset = mlflow.data.from_pandas(table, source=source, name=name)
        if context == "training":
            self._digest = dataset.digest
        if self.enabled and log:
            inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
            for attempt in range(3):
                try:
                    self.client.log_inputs(self.run_id, inputs)
                    break
                except MlflowException as exc:
                    # The server inserts a new dataset row after checking that none exists; when several trainings
                    # of one experiment start together, the losers hit the unique constraint (sqlite and
                    # PostgreSQL). The row exists by then, so the retry links it to this run.
                    duplicate = "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc)
                    if not duplicate or attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))
        return name, dataset.digest

    @property
    def dataset_digest(self) -> str | None:
        """Digest of the first dataset logged as an input of the run (also after a resume)."""
        if not self.enabled or self._digest is not None:
            return self._digest
        inputs = self.client.get_run(self.run_id).inputs
        datasets = inputs.dataset_inputs if inputs is not None else []
        training = [d for d in datasets if {t.key: t.value for t in d.tags}.get(MLFLOW_DATASET_CONTEXT) == "training"]
        self._digest = (training or datasets)[0].dataset.digest if datasets else None
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
