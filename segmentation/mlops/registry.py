"""The model registry's versions: what a model URI points at, a version (or an error listing those that exist), a
model's aliases, the evaluation numbers written on a version and the description a deployment team reads first.

Stages are deprecated in MLflow 3 and the registry UI no longer shows them, so only aliases are used:
``models:/<name>@production`` is what serving loads, ``models:/<name>@previous`` is kept for rollback. Moving them
is :mod:`segmentation.mlops.promotion`; the ONNX export's aliases follow through :mod:`segmentation.mlops.companions`.
An evaluation's headline number goes into the version's tags (``eval/mIoU`` with ``eval/data``, the data and split it
was measured on), so that promotion compares only numbers measured on the same data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

PRODUCTION = "production"
PREVIOUS = "previous"  # production's rollback target; another alias has its own (previous_alias)
METRIC = "eval/mIoU"
DATA_TAG = "eval/data"
RUN_TAG = "eval/run_id"
PROTOCOL_TAG = "eval/protocol"  # JSON: data path, split, TTA; lets promote re-run the evaluation on an incumbent


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points at; ``tags`` links an evaluation run to it."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None  # the MLflow 3 LoggedModel behind a registered version

    @property
    def tags(self) -> dict[str, str]:
        tags = {
            "model_uri": self.uri,
            "model_name": self.name,
            "model_version": self.version,
            "model_run_id": self.run_id,
        }
        return {k: v for k, v in tags.items() if v}


def describe_model_uri(model_uri: str, client: MlflowClient | None = None) -> ModelRef:
    """Resolve ``models:/name/version``, ``models:/name/latest``, ``models:/name@alias`` and ``runs:/id/...`` to
    name, version and run id (``latest``: the highest version number, as MLflow resolves it).

    Local paths and URIs the registry does not know come back with ``uri`` only.
    """
    client = client or MlflowClient()
    if match := re.fullmatch(r"models:/([^/@]+)(?:/(\d+|latest)|@([^/]+))/?", model_uri):
        name, version, alias = match.groups()
        try:
            if alias:
                mv = client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                mv = max(client.search_model_versions(f"name = {filter_literal(name)}"), key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
        except (MlflowException, ValueError):  # ValueError: max() of a model without versions
            return ModelRef(model_uri, name, None if version == "latest" else version)
        return ModelRef(model_uri, name, str(mv.version), mv.run_id, logged_model_id(mv))
    if match := re.fullmatch(r"runs:/([^/]+)(/.*)?", model_uri):
        return ModelRef(model_uri, run_id=match.group(1))
    return ModelRef(model_uri)


def logged_model_id(version: ModelVersion) -> str | None:
    """The LoggedModel behind a registered version (its ``source`` is ``models:/<model_id>`` in MLflow 3)."""
    if getattr(version, "model_id", None):
        return version.model_id
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return match.group(1) if match else None


def get_version(model_name: str, version: str | int, client: MlflowClient | None = None) -> ModelVersion:
    """The registered version, or ``ValueError`` listing the versions (or models) that do exist."""
    client = client or MlflowClient()
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException:
        pass
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        models = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"registered model {model_name!r} does not exist; registered models: {models}") from None
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name = {filter_literal(model_name)}"))
    raise ValueError(f"model {model_name!r} has no version {str(version)!r}; existing versions: {existing}") from None


def aliases_of(model_name: str, client: MlflowClient | None = None) -> dict[str, str]:
    """``{alias: version}`` of a registered model, versions as strings (a sqlite store returns ints)."""
    client = client or MlflowClient()
    return {alias: str(version) for alias, version in client.get_registered_model(model_name).aliases.items()}


def record_evaluation(
    model_name: str,
    version: str | int,
    value: float,
    data_key: str,
    run_id: str | None = None,
    metric: str = METRIC,
    extra_tags: Mapping[str, str] | None = None,
    client: MlflowClient | None = None,
) -> None:
    """Write an evaluation's headline number onto the model version (tags ``eval/mIoU``, ``eval/data``, ...)."""
    client = client or MlflowClient()
    tags = {
        metric: repr(float(value)),
        DATA_TAG: data_key,
        **({RUN_TAG: run_id} if run_id else {}),
        **(extra_tags or {}),
    }
    for key, tag_value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, tag_value)


def document_model(
    model_name: str, class_names: list[str], tags: Mapping[str, object], client: MlflowClient | None = None
) -> None:
    """Give a registered model the description and tags a deployment team reads first.

    The description says what the model does, its classes and how to call it (the serving contract of
    :mod:`segmentation.mlops.serving`); ``tags`` (task, num_classes, data digest, best score, source run...) are set
    on the registered model, empty values skipped.
    """
    client = client or MlflowClient()
    description = (
        f"Semantic segmentation (FC-HarDNet), {len(class_names)} classes: {', '.join(class_names)}.\n\n"
        "Input: a DataFrame column `image` of base64-encoded PNG or JPEG files of any size (decoded with their EXIF "
        "orientation). Output per image: `mask` (base64 PNG of class ids, 255 = "
        'none, same size as the input), `height`, `width`, and with params {"colorize": true} `colorized` '
        "(base64 RGB PNG in the class colours).\n\n"
        f"Call it: `mlflow models serve -m models:/{model_name}@production`, then POST "
        '`{"dataframe_records": [{"image": "<base64 PNG>"}]}` to /invocations; or '
        f"`mlflow.pyfunc.load_model('models:/{model_name}@production').predict(df)`."
    )
    client.update_registered_model(model_name, description=description)
    for key, value in tags.items():
        if value not in (None, ""):
            set_registered_model_tag(model_name, key, str(value), client)


# What a SQL store's unique constraint says when two requests insert the same row (sqlite, PostgreSQL, MySQL).
_INSERT_RACE = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def set_registered_model_tag(model_name: str, key: str, value: str, client: MlflowClient, attempts: int = 3) -> None:
    """Set a registered model's tag, also when another process sets the same new tag at the same moment.

    MLflow's SQL store creates a tag row after reading that it does not exist, so the first writes of one tag by
    two trainings registering versions together can collide: the loser gets HTTP 400 with the database's
    unique-constraint error. The row exists by then, so writing again updates it.
    """
    for attempt in range(1, attempts + 1):
        try:
            client.set_registered_model_tag(model_name, key, value)
            return
        except MlflowException as exc:
            first_line = str(exc).split("\n", 1)[0]  # the store's error; the SQL and its values follow
            if attempt == attempts or not any(marker in first_line for marker in _INSERT_RACE):
                raise
            time.sleep(0.1 * attempt)


def find_evaluation(
    model_name: str, version: str | int, data_key: str | None, metric: str = METRIC, client: MlflowClient | None = None
) -> float | None:
    """The version's ``metric`` on ``data_key``: from its tags, else from the newest evaluation run linked to it."""
    client = client or MlflowClient()
    tags = client.get_model_version(model_name, str(version)).tags
    if metric in tags and (data_key is None or tags.get(DATA_TAG) == data_key):
        return float(tags[metric])
    if data_key is None:
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        order_by=["attributes.start_time DESC"],
        max_results=20,
        filter_string=(
            f"tags.model_name = '{model_name}' and tags.model_version = '{version}' "
            f"and tags.`{DATA_TAG}` = '{data_key}'"
        ),
    )
    return next((run.data.metrics[metric] for run in runs if metric in run.data.metrics), None)


def filter_literal(value: str) -> str:
    # MLflow's search filters have no escape sequences: use the quote character the value does not contain.
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search for a value containing both quote characters: {value}")


def previous_alias(alias: str) -> str:
    """The alias that keeps ``alias``'s last holder for a rollback: ``previous`` for ``production``,
    ``previous-<alias>`` for any other (promoting ``staging`` must not change what rolling back production restores).
    """
    return PREVIOUS if alias == PRODUCTION else f"{PREVIOUS}-{alias}"
