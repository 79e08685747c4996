"""The training's MLflow run behind a small :class:`Tracker`, used by the main process only.

Start-up writes (params, the resolved config, the dataset, tags) go straight to the server
(:class:`~segmentation.mlops.run_setup.RunSetup`). After :meth:`Tracker.open_journal`, every write (metrics, images,
checkpoint uploads, the model, the final status) is a record of a local :class:`~segmentation.mlops.journal.Journal`
under ``<output_dir>/<run_id>/tracking/`` that a background thread delivers (:mod:`segmentation.mlops.delivery`), so
a tracking-server outage neither stops nor slows training and loses nothing. Runs are started, attached to and
resumed in :mod:`segmentation.mlops.runs`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np

from segmentation.io import write_bytes_atomic, write_text_atomic
from segmentation.mlops.delivery import Delivery, check_record, is_transient, superseded
from segmentation.mlops.journal import Journal
from segmentation.mlops.journal_file import META_FILE, QUARANTINE_FILE, REJECTED_FILE
from segmentation.mlops.run_setup import RunSetup
from segmentation.mlops.system_metrics import SystemMetricsSampler

logger = logging.getLogger(__name__)

JOURNAL_DIR = "tracking"  # beside checkpoints/ in <output_dir>/<run_id>/
SYNC_COMMAND = "python -m entrypoints.sync_tracking"
# Metric records logged within this many seconds travel in one request (see segmentation.mlops.journal_sender): the
# server and the sender then cost a training that logs every step a request every 2 s rather than one per step.
METRICS_INTERVAL_S = 2.0


class Tracker(RunSetup):
    """The training's MLflow run; every method is a no-op when ``enabled`` is False (non-main ranks).

    Start-up writes (params, config, dataset, tags) go straight to the server (:class:`RunSetup`). After
    :meth:`open_journal`, metrics, images, checkpoint uploads, the model and the final status go through the journal
    instead (without a journal they are sent synchronously).
    """

    def __init__(self, run_id: str | None, enabled: bool = True, tracking_uri: str | None = None) -> None:
        super().__init__(run_id, enabled, tracking_uri)
        self.journal: Journal | None = None
        self._delivery = Delivery(self.client, run_id, journal_dir=None)  # set when a journal is opened
        self._sampler: SystemMetricsSampler | None = None
        self.system_metrics = True
        self.unjournaled = 0  # writes lost because the journal could not take them (disk full...)
        self.unjournaled_error: str | None = None  # the first such failure

    @property
    def model_version(self) -> str | None:
        """The registry version created by the ``model`` record, once delivered."""
        return self._delivery.model_version

    # -- during training (journaled) -------------------------------------------------------------------------------
    def open_journal(
        self,
        directory: str | Path,
        system_metrics_interval: float = 10.0,
        metrics_interval: float = METRICS_INTERVAL_S,
    ) -> None:
        """Route every later write through a journal in ``directory`` (reopened as is after a kill or a resume).

        Args:
            directory: the journal folder (``<output_dir>/<run_id>/tracking``).
            system_metrics_interval: seconds between two ``system/*`` samples; 0 turns sampling off.
            metrics_interval: seconds during which metric records are gathered into one request.
        """
        if not self.enabled:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"run_id": self.run_id, "tracking_uri": self.tracking_uri}
        write_text_atomic(directory / META_FILE, json.dumps(meta))
        self._delivery.journal_dir = directory  # before the Journal: its thread may send a backlog at once
        self.journal = Journal(
            directory,
            self._delivery.send,
            is_transient,
            min_interval_s=metrics_interval,
            check=check_record,
            superseded=superseded,
        )
        for record in self.journal.records:
            if record["kind"] in ("metrics", "image"):
                for key in record["values"] if record["kind"] == "metrics" else [record["key"]]:
                    self._logged_steps[key] = max(self._logged_steps.get(key, -1), record["step"])
        if system_metrics_interval > 0 and self.system_metrics:
            first = self._logged_steps.get("system/cpu_utilization_percentage", -1) + 1
            self._sampler = SystemMetricsSampler(self.run_id, system_metrics_interval, self.log_metrics, first)
            self._sampler.start()

    def _write(self, record: dict) -> None:
        if self.journal is None:  # no journal (a tool, not a training): write synchronously
            self._delivery.send([record])
            return
        try:
            self.journal.append(record)
        except OSError as exc:  # a full disk must not stop training through its tracking; end() reports it
            self._unjournaled(f"{record['kind']} record: {exc}")

    def _unjournaled(self, error: str) -> None:
        if self.unjournaled_error is None:
            self.unjournaled_error = error
            logger.error(
                "tracking journal %s cannot take writes (%s); training goes on", self.journal.directory, error
            )
        self.unjournaled += 1

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int,
        dataset: tuple[str, str] | None = None,
        model: str | None = None,
    ) -> None:
        """Log numeric metrics at ``step``; with ``dataset`` (``(name, digest)``) and ``model`` (the name of a
        LoggedModel of this run, logged before) they are linked to both.

        A non-numeric value raises instead of vanishing.

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
            record = {"kind": "metrics", "step": step, "timestamp": int(time.time() * 1000), "values": values}
            if dataset is not None:
                record["dataset"] = list(dataset)
            if model is not None:
                record["model"] = model
            self._write(record)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """A step-indexed image (H x W x 3 uint8 RGB): the UI shows a slider over steps."""
        if not self.enabled or step <= self._logged_steps.get(key, -1):
            return
        if self.journal is None:
            self.client.log_image(self.run_id, image, key=key, step=step)
            return
        path = self.journal.directory / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}-{step:08d}.png"
        self._logged_steps[key] = step
        try:
            write_bytes_atomic(path, cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].tobytes())
        except OSError as exc:
            self._unjournaled(f"image {path}: {exc}")
            return
        self._write(
            {
                "kind": "image",
                "key": key,
                "step": step,
                "timestamp": int(time.time() * 1000),
                "file": str(path.relative_to(self.journal.directory)),
            }
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str, last: str | None = None) -> None:
        """Upload a folder in the background, file ``last`` after all others (skipped if the folder is gone)."""
        if self.enabled:
            self._write(
                {"kind": "artifacts", "local": str(Path(local_dir).resolve()), "path": artifact_path, "last": last}
            )

    def delete_artifacts(self, path: str) -> None:
        """Remove run artifacts (pruned checkpoints), after the uploads queued before."""
        if self.enabled:
            self._write({"kind": "delete", "path": path})

    def log_model(self, package: str | Path, step: int, name: str) -> None:
        """Log a saved model package as a LoggedModel ``name`` of the run at ``step``, in the background.

        MLflow links the run's metrics at ``step`` (the validation that chose this checkpoint) to the model.
        """
        if self.enabled:
            self._write({"kind": "model", "package": str(Path(package).resolve()), "name": name, "step": step})

    def register_model(self, name: str, registered_model: str, version_tags: Mapping[str, Any]) -> None:
        """Register this run's LoggedModel ``name`` as a new version of ``registered_model``, in the background."""
        if self.enabled:
            self._write(
                {
                    "kind": "register",
                    "name": name,
                    "registered_model": registered_model,
                    "version_tags": dict(version_tags),
                }
            )

    def delete_model(self, name: str, package: str | Path) -> None:
        """Delete the LoggedModel ``name`` of this run (a pruned checkpoint's), then its local ``package``, after
        what was queued before (the package's own upload included)."""
        if self.enabled:
            self._write({"kind": "delete_model", "name": name, "package": str(Path(package).resolve())})
        else:
            shutil.rmtree(package, ignore_errors=True)

    def end(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        """Queue the final status and wait up to ``timeout`` s for the journal to reach the server.

        Returns:
            True when everything was journaled, delivered and accepted; otherwise :meth:`undelivered` says what is
            missing (and it is logged): undelivered records stay in the journal for :data:`SYNC_COMMAND`, records
            set aside are listed in its ``quarantine.jsonl`` and ``rejected.jsonl``.
        """
        if not self.enabled:
            return True
        if self.journal is None:  # started but never journaled (evaluation, or a failure during start-up)
            try:
                mlflow.flush_async_logging()
            except Exception as exc:  # noqa: BLE001 - ending the run matters more than a failed flush
                logger.warning("could not flush async logging of run %s: %s", self.run_id, exc)
            if mlflow.active_run() is not None:
                mlflow.end_run(status=status)
            else:
                self.client.set_terminated(self.run_id, status)
            return True
        if self._sampler is not None:
            self._sampler.stop()
        self._write({"kind": "end", "status": status, "timestamp": int(time.time() * 1000)})
        self.journal.close(timeout)
        report = self.undelivered()
        if report:
            logger.error("run %s: tracking incomplete: %s", self.run_id, report)
        return report is None

    def undelivered(self) -> str | None:
        """What of the run's journaled tracking did not reach the server, in one line; None when nothing."""
        journal, parts = self.journal, []
        if journal is None:
            return None
        if self.unjournaled:
            parts.append(f"{self.unjournaled} write(s) could not be journaled (first error: {self.unjournaled_error})")
        if journal.pending:
            parts.append(
                f"{journal.pending} record(s) not delivered yet to {self.tracking_uri} ({journal.last_error}); upload "
                f"them with `{SYNC_COMMAND} {journal.directory}`"
            )
        if journal.quarantined:
            reasons = "; ".join(journal.quarantine_reasons[:3])
            parts.append(
                f"{journal.quarantined} record(s) quarantined in {journal.directory / QUARANTINE_FILE} (damaged, or "
                f"their local files are gone{': ' + reasons if reasons else ''})"
            )
        if journal.rejected:
            parts.append(
                f"{journal.rejected} record(s) rejected by the server, listed in {journal.directory / REJECTED_FILE}"
            )
        if journal.failure:
            parts.append(f"the journal's sender failed: {journal.failure}")
        return "; ".join(parts) or None
