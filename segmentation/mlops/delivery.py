"""How each kind of journal record reaches the tracking server: a table from record kind to handler.

The journal's sender thread (:mod:`segmentation.mlops.journal`) calls :meth:`Delivery.send` with a batch of records
of one kind (several ``metrics`` records, or one record of any other kind). Failures are classified by
:func:`is_transient`: the journal retries those and sets the others aside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking.artifact_utils import get_artifact_repository

from segmentation.mlops.model_store import log_model_package
from segmentation.mlops.registry import document_model
from segmentation.models.package import read_package_meta

logger = logging.getLogger(__name__)

_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "ENDPOINT_NOT_FOUND",
}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed tracking write may succeed later (server down, 5xx, auth to fix) rather than never."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or exc.get_http_status_code() >= 500
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith(("requests", "urllib3"))


class Delivery:
    """Sends journal records of one run; ``model_version`` holds the version a ``model`` record registered.

    Args:
        client: the client of the run's tracking server.
        run_id: the run the records belong to.
        journal_dir: the journal folder (image records name files relative to it).
    """

    def __init__(self, client: MlflowClient, run_id: str | None, journal_dir: Path | None) -> None:
        self.client, self.run_id, self.journal_dir = client, run_id, journal_dir
        self.model_version: str | None = None
        self._handlers: dict[str, Callable[[list[dict]], None]] = {
            "metrics": self._metrics,
            "image": self._image,
            "artifacts": self._artifacts,
            "delete": self._delete,
            "model": self._model,
            "end": self._end,
        }

    def send(self, batch: list[dict]) -> None:
        kind = batch[0]["kind"]
        handler = self._handlers.get(kind)
        if handler is None:
            raise ValueError(f"unknown journal record kind {kind!r}; known: {', '.join(self._handlers)}")
        handler(batch)

    def _metrics(self, batch: list[dict]) -> None:
        metrics = [Metric(k, v, r["timestamp"], r["step"]) for r in batch for k, v in r["values"].items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def _image(self, batch: list[dict]) -> None:
        record = batch[0]
        image = cv2.imread(str(self.journal_dir / record["file"]), cv2.IMREAD_COLOR)[..., ::-1]
        self.client.log_image(
            self.run_id,
            np.ascontiguousarray(image),
            key=record["key"],
            step=record["step"],
            timestamp=record["timestamp"],
            synchronous=True,
        )

    def _artifacts(self, batch: list[dict]) -> None:
        record = batch[0]
        local = Path(record["local"])  # a folder pruned before its turn has nothing left to upload
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        # The marker file goes last: a reader that finds it on the server finds the rest too.
        for file in sorted(files, key=lambda f: f.name == record.get("last")):
            parent = file.parent.relative_to(local).as_posix()
            target = record["path"] if parent == "." else f"{record['path']}/{parent}"
            self.client.log_artifact(self.run_id, str(file), target)

    def _delete(self, batch: list[dict]) -> None:
        path = batch[0]["path"]
        repo = get_artifact_repository(self.client.get_run(self.run_id).info.artifact_uri)
        try:
            repo.delete_artifacts(path)
        except (NotImplementedError, FileNotFoundError) as exc:
            logger.warning("could not delete artifact %s of run %s: %s", path, self.run_id, exc)

    def _model(self, batch: list[dict]) -> None:
        record = batch[0]
        with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):  # log_model needs an active run
            info = log_model_package(
                record["package"],
                name=record["name"],
                registered_model_name=record.get("registered_model"),
                step=record["step"],
            )
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            name, version_tags = record["registered_model"], record.get("version_tags", {})
            for key, value in version_tags.items():
                self.client.set_model_version_tag(name, str(version), key, str(value))
            meta = read_package_meta(record["package"])
            registered_model_tags = {
                "task": "semantic-segmentation",
                "num_classes": meta["num_classes"],
                "training_data_digest": version_tags.get("data_digest"),
                "latest_version_val_mIoU": version_tags.get("val/mIoU"),
                "latest_version_run_id": self.run_id,
            }
            document_model(name, meta["classes"]["names"], registered_model_tags, self.client)
            self.model_version = str(version)

    def _end(self, batch: list[dict]) -> None:
        self.client.set_terminated(self.run_id, batch[0]["status"], end_time=batch[0]["timestamp"])
