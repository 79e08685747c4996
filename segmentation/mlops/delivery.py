"""How each kind of journal record reaches the tracking server: a table from record kind to handler.

The journal's sender thread (:mod:`segmentation.mlops.journal_sender`) calls :meth:`Delivery.send` with a batch of
records of one kind (several ``metrics`` records, or one record of any other kind). Failures are classified by
:func:`is_transient`: the journal retries those (network, server) and sets the others aside: a local file that is
gone or unreadable (``OSError``) or a record that does not fit :data:`RECORD_FIELDS` (:class:`DamagedRecord`) is
quarantined, anything else the server refused is rejected. :func:`check_record` vets records read back from disk.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking.artifact_utils import get_artifact_repository

from segmentation.mlops.journal_file import DamagedRecord
from segmentation.mlops.model_store import CLASS_NAMES_TAG, log_model_package
from segmentation.mlops.registry import document_model

logger = logging.getLogger(__name__)

_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "ENDPOINT_NOT_FOUND",
}


# A file error on this machine (the file to upload is gone or unreadable) will not heal by retrying.
_LOCAL_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}

# The fields each record kind must carry, and their types (records are read back from a file that may be damaged).
RECORD_FIELDS: dict[str, dict[str, type]] = {
    "metrics": {"step": int, "timestamp": int, "values": dict},
    "image": {"key": str, "step": int, "timestamp": int, "file": str},
    "artifacts": {"local": str, "path": str},
    "delete": {"path": str},
    "model": {"package": str, "name": str, "step": int},
    "register": {"name": str, "registered_model": str, "version_tags": dict},
    "delete_model": {"name": str, "package": str},
    "end": {"status": str, "timestamp": int},
}


def is_transient(exc: BaseException) -> bool:
    """Whether a failed tracking write may succeed later (server down, 5xx, auth to fix) rather than never.

    Network errors are transient (``requests``' errors are ``OSError`` too); a local file error such as a missing or
    unreadable file is not. Other ``OSError`` (a full disk while packaging the model) may heal and is retried.
    """
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or exc.get_http_status_code() >= 500
    if type(exc).__module__.startswith(("requests", "urllib3")) or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno not in _LOCAL_ERRNOS


def check_record(record: dict) -> None:
    """Raise :class:`DamagedRecord` unless ``record`` has a known kind and the fields :class:`Delivery` needs."""
    kind = record["kind"]
    fields = RECORD_FIELDS.get(kind)
    if fields is None:
        raise DamagedRecord(f"unknown record kind {kind!r}; known: {', '.join(RECORD_FIELDS)}")
    for name, expected in fields.items():
        if name not in record:
            raise DamagedRecord(f"{kind} record without its {name!r} field")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise DamagedRecord(f"{kind} record: {name!r} is {value!r}, expected {expected.__name__}")
    if kind == "metrics":
        dataset, model = record.get("dataset"), record.get("model")
        if dataset is not None and not (isinstance(dataset, list) and len(dataset) == 2):
            raise DamagedRecord(f"metrics record: 'dataset' is {dataset!r}, expected [name, digest]")
        if model is not None and not isinstance(model, str):
            raise DamagedRecord(f"metrics record: 'model' is {model!r}, expected the name of a logged model")
        for key, value in record["values"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DamagedRecord(f"metrics record: value of {key!r} is {value!r}, expected a number")


def superseded(record: dict, later: list[dict]) -> bool:
    """Whether a later record deletes what ``record`` uploads (a checkpoint folder pruned before its upload)."""
    return record["kind"] == "artifacts" and any(
        r["kind"] == "delete" and r.get("path") == record["path"] for r in later
    )


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
        self._model_ids: dict[str, str] = {}  # LoggedModel name -> id, for the models this delivery logged
        self._handlers: dict[str, Callable[[list[dict]], None]] = {
            "metrics": self._metrics,
            "image": self._image,
            "artifacts": self._artifacts,
            "delete": self._delete,
            "model": self._model,
            "register": self._register,
            "delete_model": self._delete_model,
            "end": self._end,
        }

    def send(self, batch: list[dict]) -> None:
        kind = batch[0]["kind"]
        handler = self._handlers.get(kind)
        if handler is None:
            raise DamagedRecord(f"unknown journal record kind {kind!r}; known: {', '.join(self._handlers)}")
        handler(batch)

    def _metrics(self, batch: list[dict]) -> None:
        metrics = []
        for record in batch:
            # MLflow keeps a metric's dataset only on a model's copy of it: link both, or neither.
            model_id = self._find_model(record["model"]) if record.get("model") else None
            name, digest = (record.get("dataset") or (None, None)) if model_id else (None, None)
            for key, value in record["values"].items():
                metrics.append(
                    Metric(
                        key,
                        value,
                        record["timestamp"],
                        record["step"],
                        model_id,
                        dataset_name=name,
                        dataset_digest=digest,
                    )
                )
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def _image(self, batch: list[dict]) -> None:
        record = batch[0]
        path = self.journal_dir / record["file"]
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)  # OSError names the file
        if image is None:
            raise DamagedRecord(f"image file {path} is not a readable image")
        image = image[..., ::-1]
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
        local = Path(record["local"])
        if not local.is_dir():  # a pruned checkpoint's upload is skipped by the journal (see ``superseded``)
            raise FileNotFoundError(errno.ENOENT, "folder to upload is gone", str(local))
        files = sorted(p for p in local.rglob("*") if p.is_file())
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
        if not Path(record["package"]).is_dir():  # a pruned checkpoint's package goes only after its model record
            raise FileNotFoundError(errno.ENOENT, "model package folder is gone", record["package"])
        info = log_model_package(record["package"], name=record["name"], step=record["step"], run_id=self.run_id)
        self._model_ids[record["name"]] = info.model_id

    def _find_model(self, name: str) -> str | None:
        """The id of this run's LoggedModel ``name`` (logged by this delivery, or before a resume or a restart)."""
        if name in self._model_ids:
            return self._model_ids[name]
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = '{name}'"
        )
        return found[0].model_id if found else None

    def _register(self, batch: list[dict]) -> None:
        record = batch[0]
        model_id = self._find_model(record["name"])
        if model_id is None:
            raise FileNotFoundError(f"run {self.run_id} has no logged model {record['name']!r} to register")
        name, version_tags = record["registered_model"], record.get("version_tags", {})
        version = str(mlflow.register_model(f"models:/{model_id}", name).version)
        for key, value in version_tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))
        class_names = json.loads(self.client.get_logged_model(model_id).tags.get(CLASS_NAMES_TAG, "[]"))
        registered_model_tags = {
            "task": "semantic-segmentation",
            "num_classes": len(class_names),
            "training_data_digest": version_tags.get("data_digest"),
            "latest_version_val_mIoU": version_tags.get("val/mIoU"),
            "latest_version_run_id": self.run_id,
        }
        document_model(name, class_names, registered_model_tags, self.client)
        self.model_version = version

    def _delete_model(self, batch: list[dict]) -> None:
        model_id = self._find_model(batch[0]["name"])
        if model_id is not None:
            self.client.delete_logged_model(model_id)
        if batch[0].get("package"):
            shutil.rmtree(batch[0]["package"], ignore_errors=True)

    def _end(self, batch: list[dict]) -> None:
        self.client.set_terminated(self.run_id, batch[0]["status"], end_time=batch[0]["timestamp"])
