"""Model-registry promotion with aliases: ``production`` moves only to a version that scores at least as well.

Stages are deprecated in MLflow 3 and the registry UI no longer shows them, so only aliases are used:
``models:/<name>@production`` is what serving loads, ``models:/<name>@previous`` is kept for :func:`rollback`.
Every decision is written into the version's tags (``promotion_reason``, ``compared_with``, ...), so the registry
itself says why a version holds its alias. Scores are compared only when they were measured on the same data and
split (the ``eval/data`` key written by evaluation).

*Companions* are versions of other registered models made from a version of this one (the ONNX export registered
as ``<name>-onnx``), marked by the tags ``source_model_name`` / ``source_model_version``. Whenever ``production`` or
``previous`` moves here (promotion, rollback), each companion model's alias moves to its version made from the
new holder, so ``models:/<name>-onnx@production`` serves the same network as ``models:/<name>@production`` (when
the new holder was never exported, the companion keeps its alias and a warning says so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from segmentation.mlops.locks import TagLock

PRODUCTION = "production"
PREVIOUS = "previous"
METRIC = "eval/mIoU"
DATA_TAG = "eval/data"
RUN_TAG = "eval/run_id"
PROTOCOL_TAG = "eval/protocol"  # JSON: data path, split, TTA; lets promote re-run the evaluation on an incumbent
SOURCE_NAME_TAG = "source_model_name"  # on a companion version (the ONNX export): the model it was made from
SOURCE_VERSION_TAG = "source_model_version"
PROMOTION_LOCK_TAG = "segmentation.promotion_lock"
LOCK_TIMEOUT_S = 1800.0  # an incumbent's evaluation (inside the lock) can take minutes on a large split

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Promotion:
    """Outcome of :func:`promote` or :func:`rollback`."""

    promoted: bool
    model_name: str
    version: str
    alias: str
    reason: str
    value: float | None = None
    incumbent: str | None = None
    incumbent_value: float | None = None
    forced: bool = False
    # Companion model -> {alias: its version that now holds the alias}; see sync_companions.
    companions: dict[str, dict[str, str]] = field(default_factory=dict)


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


def _alias_holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    return aliases_of(model_name, client).get(alias)


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
            client.set_registered_model_tag(model_name, key, str(value))


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


def link_companion(
    name: str, version: str | int, source_name: str, source_version: str | int, client: MlflowClient | None = None
) -> dict[str, str]:
    """Mark a version of ``name`` as made from ``source_name`` version ``source_version`` (e.g. its ONNX export).

    The version is tagged ``source_model_name`` / ``source_model_version`` and gets every alias the source
    version holds now, so exporting the ``production`` version makes its export the companion's ``production``.

    Returns:
        The aliases given to the version, ``{alias: version}``.
    """
    client = client or MlflowClient()
    version, source_version = str(version), str(source_version)
    client.set_model_version_tag(name, version, SOURCE_NAME_TAG, source_name)
    client.set_model_version_tag(name, version, SOURCE_VERSION_TAG, source_version)
    held = sorted(alias for alias, v in aliases_of(source_name, client).items() if v == source_version)
    for alias in held:
        client.set_registered_model_alias(name, alias, version)
    return dict.fromkeys(held, version)


def companion_versions(source_name: str, client: MlflowClient | None = None) -> dict[str, dict[str, str]]:
    """``{companion model: {source version: its newest version made from that source version}}``."""
    client = client or MlflowClient()
    found: dict[str, dict[str, str]] = {}
    for mv in client.search_model_versions(f"tags.`{SOURCE_NAME_TAG}` = {filter_literal(source_name)}"):
        made_from, source_version = found.setdefault(mv.name, {}), mv.tags.get(SOURCE_VERSION_TAG)
        if source_version and int(mv.version) > int(made_from.get(source_version, 0)):
            made_from[source_version] = str(mv.version)
    return found


def sync_companions(
    source_name: str, aliases: Sequence[str] = (PRODUCTION, PREVIOUS), client: MlflowClient | None = None
) -> dict[str, dict[str, str]]:
    """Give each companion model's ``aliases`` to its version made from the source version holding that alias.

    A companion with no version made from the new holder keeps its alias where it was (a warning names the
    version to export); removing it would break the next restart of a server that loads ``@production``.

    Returns:
        ``{companion model: {alias: version now holding it}}`` for the aliases that point at the right version.
    """
    client = client or MlflowClient()
    holders = aliases_of(source_name, client)
    synced: dict[str, dict[str, str]] = {}
    for companion, made_from in companion_versions(source_name, client).items():
        current = aliases_of(companion, client)
        for alias in dict.fromkeys(aliases):
            holder = holders.get(alias)
            if holder is None:
                continue
            target = made_from.get(holder)
            if target is None:
                logger.warning(
                    "%r has no version made from %r version %s, so its alias %r stays on version %s; "
                    "export that version to move it",
                    companion,
                    source_name,
                    holder,
                    alias,
                    current.get(alias),
                )
                continue
            if current.get(alias) != target:
                client.set_registered_model_alias(companion, alias, target)
            synced.setdefault(companion, {})[alias] = target
    return synced


def promotion_lock(model_name: str, client: MlflowClient | None = None) -> TagLock:
    """The lock that serializes promotions and rollbacks of ``model_name`` (registered-model tag
    ``segmentation.promotion_lock``; guarantees and limits in :mod:`segmentation.mlops.locks`)."""
    client = client or MlflowClient()

    def read() -> str | None:
        return client.get_registered_model(model_name).tags.get(PROMOTION_LOCK_TAG)

    return TagLock(
        f"registered model {model_name!r}",
        read,
        lambda value: client.set_registered_model_tag(model_name, PROMOTION_LOCK_TAG, value),
        lambda: client.delete_registered_model_tag(model_name, PROMOTION_LOCK_TAG),
    )


@contextlib.contextmanager
def _held(lock: TagLock, timeout: float) -> Iterator[None]:
    lock.acquire(timeout)
    try:
        yield
    finally:
        lock.release()


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"


def promote(
    model_name: str,
    version: str | int,
    *,
    alias: str = PRODUCTION,
    metric: str = METRIC,
    candidate_value: float | None = None,
    data_key: str | None = None,
    evaluate_incumbent: Callable[[str], float] | None = None,
    force: bool = False,
    run_id: str | None = None,
    client: MlflowClient | None = None,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> Promotion:
    """Give ``alias`` to ``version`` if its ``metric`` is >= the current holder's on the same data.

    The previous holder gets alias ``previous``. The comparison and the alias moves happen under the registered
    model's promotion lock (:func:`promotion_lock`), so concurrent promoters are serialized: however many run at
    once, ``alias`` ends on the best-scoring one and ``previous`` on the version it displaced. A missing or NaN
    score (an unlabeled split) is never promoted without ``force``. The decision and the numbers go into the
    candidate's tags (``promotion_reason``, ``compared_with``, ``promoted_by_run``, ``promotion_forced``,
    ``eval/mIoU``).

    Args:
        model_name: registered model.
        version: candidate version.
        alias: the alias to move (``production``).
        metric: the number compared (higher is better).
        candidate_value: the candidate's number; default: read from its tags / linked evaluation runs.
        data_key: identifies the data and split the number was measured on; default: the candidate's ``eval/data``.
        evaluate_incumbent: called with the holder's version when it has no number for ``data_key``; returns it.
        force: promote whatever the numbers say (recorded in the tags).
        run_id: the evaluation run that decided, recorded as ``promoted_by_run``.
        client: MLflow client (default: the current tracking/registry URI).
        lock_timeout: seconds to wait for other promotions of this model to finish.

    Returns:
        A :class:`Promotion` saying whether the alias moved and why.

    Raises:
        ValueError: the version does not exist (existing versions listed), or a number needed for the comparison
            is missing or NaN and ``force`` is not set.
        TimeoutError: another promotion held the model's lock for ``lock_timeout`` seconds (the message names it).
    """
    client = client or MlflowClient()
    version = str(get_version(model_name, version, client).version)
    data_key = data_key or client.get_model_version(model_name, version).tags.get(DATA_TAG)
    if candidate_value is None:
        candidate_value = find_evaluation(model_name, version, data_key, metric, client)
    if candidate_value is None and not force:
        raise ValueError(
            f"version {version} of {model_name!r} has no {metric} on data {data_key!r}: evaluate it "
            "first (evaluate entry point with promote=true) or pass force=true"
        )
    if candidate_value is not None and math.isnan(candidate_value) and not force:
        raise ValueError(
            f"version {version} of {model_name!r} scored {metric}=nan on data {data_key!r} (a split without labels "
            "gives no score): a NaN score is never promoted; evaluate it on a labelled split or pass force=true"
        )
    with _held(promotion_lock(model_name, client), lock_timeout):
        return _promote_locked(
            client, model_name, version, alias, metric, candidate_value, data_key, evaluate_incumbent, force, run_id
        )


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _promote_locked(
    client: MlflowClient,
    model_name: str,
    version: str,
    alias: str,
    metric: str,
    candidate_value: float | None,
    data_key: str | None,
    evaluate_incumbent: Callable[[str], float] | None,
    force: bool,
    run_id: str | None,
) -> Promotion:
    """:func:`promote` from reading the holder to moving the aliases; the caller holds the promotion lock."""
    incumbent = _alias_holder(client, model_name, alias)
    if incumbent == version:  # still bring companions exported since the promotion in line
        return Promotion(
            False,
            model_name,
            version,
            alias,
            f"version {version} already holds alias {alias!r}",
            candidate_value,
            incumbent,
            candidate_value,
            force,
            sync_companions(model_name, (alias, PREVIOUS), client),
        )
    incumbent_value = None
    if incumbent is not None:
        incumbent_value = find_evaluation(model_name, incumbent, data_key, metric, client)
        if incumbent_value is None and evaluate_incumbent is not None:
            incumbent_value = float(evaluate_incumbent(incumbent))
            if data_key:
                record_evaluation(model_name, incumbent, incumbent_value, data_key, metric=metric, client=client)
        if not _finite(incumbent_value) and not force:
            found = "no" if incumbent_value is None else "a NaN"
            raise ValueError(
                f"the {alias!r} version {incumbent} of {model_name!r} has {found} {metric} on data "
                f"{data_key!r} to compare with; evaluate it on the same (labelled) data or pass force=true"
            )
    compared = (
        f"version {incumbent} ({metric}={_fmt(incumbent_value)})"
        if incumbent is not None
        else f"none (no version held {alias!r})"
    )
    better = _finite(candidate_value) and (
        incumbent is None or (_finite(incumbent_value) and candidate_value >= incumbent_value)
    )
    if better:
        reason = (
            f"{metric} {_fmt(candidate_value)} >= {compared}"
            if incumbent is not None
            else f"first version to hold {alias!r} ({metric} {_fmt(candidate_value)})"
        )
    elif force:
        reason = f"FORCED: {metric} {_fmt(candidate_value)} vs {compared}; promoted anyway (force=true)"
    else:
        reason = f"not promoted: {metric} {_fmt(candidate_value)} < {compared}"
    promoted = better or force
    companions = {}
    if promoted:
        if incumbent is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, incumbent)
        client.set_registered_model_alias(model_name, alias, version)
        companions = sync_companions(model_name, (alias, PREVIOUS), client)
    tags = {"promotion_reason": reason, "compared_with": compared, "promotion_forced": str(force and not better)}
    if promoted and run_id:
        tags["promoted_by_run"] = run_id
    if candidate_value is not None:
        tags[metric] = repr(float(candidate_value))
        if data_key:
            tags[DATA_TAG] = data_key
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return Promotion(
        promoted,
        model_name,
        version,
        alias,
        reason,
        candidate_value,
        incumbent,
        incumbent_value,
        force and not better,
        companions,
    )


def rollback(
    model_name: str,
    *,
    alias: str = PRODUCTION,
    client: MlflowClient | None = None,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> Promotion:
    """Swap ``alias`` and ``previous``: the version that held ``alias`` before the last promotion gets it back.

    Companion models (the ONNX export) follow, as in :func:`promote`, under the same promotion lock.

    Raises:
        ValueError: the model does not exist, or no version holds ``previous``.
        TimeoutError: a promotion held the model's lock for ``lock_timeout`` seconds.
    """
    client = client or MlflowClient()
    try:
        aliases_of(model_name, client)
    except MlflowException:
        models = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"registered model {model_name!r} does not exist; registered models: {models}") from None
    with _held(promotion_lock(model_name, client), lock_timeout):
        return _rollback_locked(client, model_name, alias)


def _rollback_locked(client: MlflowClient, model_name: str, alias: str) -> Promotion:
    aliases = aliases_of(model_name, client)
    previous, current = aliases.get(PREVIOUS), aliases.get(alias)
    if previous is None:
        raise ValueError(f"model {model_name!r} has no {PREVIOUS!r} alias to roll back to (aliases: {aliases})")
    client.set_registered_model_alias(model_name, alias, previous)
    if current is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, current)
    reason = f"rollback: restored {alias!r} from version {current}"
    client.set_model_version_tag(model_name, previous, "promotion_reason", reason)
    companions = sync_companions(model_name, (alias, PREVIOUS), client)
    return Promotion(True, model_name, str(previous), alias, reason, incumbent=current, companions=companions)
