"""The ``promote`` step: move a registry alias (``production``) to a version that scores at least as well, or roll
it back to ``previous``."""

from __future__ import annotations

import json

import mlflow

from segmentation.mlops import promotion, registry
from segmentation.mlops.connection import check_tracking_server
from segmentation.mlops.runs import attached_run
from segmentation.steps.evaluate import Protocol, incumbent_evaluator, promotion_tags


def promote_step(
    model_name: str, version: str = "", alias: str = registry.PRODUCTION, force: bool = False, rollback: bool = False
) -> promotion.Promotion:
    """Promote ``version`` using the number its last evaluation recorded, or roll ``alias`` back.

    The incumbent is evaluated on the same data (from the candidate's ``eval/protocol`` tag) when it has no
    comparable number.

    Raises:
        ConnectionError: the tracking server does not answer (checked before anything is read).
        ValueError: no ``version`` without ``rollback``, ``version`` or ``force`` with ``rollback`` (a rollback takes
            the alias's ``previous``), an unknown model or version, or nothing to roll back to.
    """
    check_tracking_server()
    if rollback and (version or force):
        raise ValueError(
            f"rollback=true gives {alias!r} back to the version its 'previous' alias names; it takes no version "
            f"or force (got version={version!r}, force={force})"
        )
    if rollback:
        return promotion.rollback(model_name, alias=alias)
    if not version:
        raise ValueError("version is required to promote (or pass rollback=true)")
    candidate = registry.get_version(model_name, version)
    protocol_json = candidate.tags.get(registry.PROTOCOL_TAG)
    evaluator = None
    if protocol_json:
        evaluator = incumbent_evaluator(model_name, Protocol(**json.loads(protocol_json)))
    with attached_run(create=False) as run_id:
        outcome = promotion.promote(
            model_name,
            version,
            alias=alias,
            force=force,
            evaluate_incumbent=evaluator,
            run_id=run_id or candidate.tags.get(registry.RUN_TAG),
        )
        if run_id:
            mlflow.set_tags({**promotion_tags(outcome), "model_name": model_name, "model_version": str(version)})
    return outcome
