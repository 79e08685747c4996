"""Promotion with aliases: ``production`` moves only to a version that scores at least as well; :func:`rollback`
gives it back to ``previous``.

Every decision is written into the version's tags (``promotion_reason``, ``compared_with``, ...), so the registry
itself says why a version holds its alias. Scores are compared only when they were measured on the same data and
split (the ``eval/data`` key written by evaluation, :mod:`segmentation.mlops.registry`). Promotions and rollbacks of a
model are serialized by a lock on it (:mod:`segmentation.mlops.locks`), and companion models (the ONNX export) follow
every move (:mod:`segmentation.mlops.companions`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from segmentation.mlops.companions import sync_companions
from segmentation.mlops.locks import TagLock
from segmentation.mlops.registry import (
    DATA_TAG,
    METRIC,
    PRODUCTION,
    aliases_of,
    find_evaluation,
    get_version,
    previous_alias,
    record_evaluation,
)

PROMOTION_LOCK_TAG = "segmentation.promotion_lock"
LOCK_TIMEOUT_S = 1800.0  # an incumbent's evaluation (inside the lock) can take minutes on a large split


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


def _alias_holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    return aliases_of(model_name, client).get(alias)


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
            sync_companions(model_name, (alias, previous_alias(alias)), client),
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
            client.set_registered_model_alias(model_name, previous_alias(alias), incumbent)
        client.set_registered_model_alias(model_name, alias, version)
        companions = sync_companions(model_name, (alias, previous_alias(alias)), client)
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
    """Swap ``alias`` and its rollback alias (:func:`~segmentation.mlops.registry.previous_alias`: ``previous`` for
    ``production``): the version that held ``alias`` before its last promotion gets it back.

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
    back = previous_alias(alias)
    previous, current = aliases.get(back), aliases.get(alias)
    if previous is None:
        raise ValueError(f"model {model_name!r} has no {back!r} alias to roll {alias!r} back to (aliases: {aliases})")
    client.set_registered_model_alias(model_name, alias, previous)
    if current is not None:
        client.set_registered_model_alias(model_name, back, current)
    reason = f"rollback: restored {alias!r} from version {current}"
    client.set_model_version_tag(model_name, previous, "promotion_reason", reason)
    companions = sync_companions(model_name, (alias, previous_alias(alias)), client)
    return Promotion(True, model_name, str(previous), alias, reason, incumbent=current, companions=companions)
