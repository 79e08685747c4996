"""Multistep runs: each step of the pipeline as a child run of one parent, reused when it already FINISHED.

This follows MLflow's multistep-workflow pattern: a parent run launches each entry point with
``mlflow.projects.run`` (each becomes a child run tagged ``mlflow.parentRunId``) and passes what one step made to
the next as parameters. A step that already FINISHED with the same parameters and the same code version is reused
instead of being run again, so re-running the pipeline after a failure redoes only what is missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.projects.utils import get_git_commit
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

from segmentation.mlops.registry import filter_literal

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the folder holding MLproject


EMPTY_AS_LOGGED = ("", "''")  # MLflow records an empty project parameter as the shell-quoted ``''``


def find_finished_run(
    client: MlflowClient, experiment_id: str, entry_point: str, parameters: dict[str, str], git_commit: str | None
) -> Run | None:
    """The newest FINISHED run of ``entry_point`` with exactly these parameter values (and code version).

    Non-empty values are matched by the server's search; empty ones are compared here, because how an empty
    value is stored (``''`` or nothing) is not something a search filter can rely on.
    """
    clauses = [
        f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = {filter_literal(entry_point)}",
        "attributes.status = 'FINISHED'",
    ]
    clauses += [
        f"params.`{key}` = {filter_literal(str(value))}" for key, value in parameters.items() if str(value) != ""
    ]
    if git_commit:
        clauses.append(f"tags.`{MLFLOW_GIT_COMMIT}` = {filter_literal(git_commit)}")
    empty = [key for key, value in parameters.items() if str(value) == ""]
    runs = client.search_runs([experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"])
    for run in runs:
        if all(run.data.params.get(key, "") in EMPTY_AS_LOGGED for key in empty):
            return run
    return None


def _git_commit() -> str | None:
    return get_git_commit(str(PROJECT_DIR))


def run_step(entry_point: str, parameters: dict[str, str], reuse: bool = True) -> Run:
    """Run one entry point as a child of the active run, or reuse a FINISHED run with the same parameters."""
    client = MlflowClient()
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id
    parameters = {key: str(value) for key, value in parameters.items()}
    if reuse:
        previous = find_finished_run(client, experiment_id, entry_point, parameters, _git_commit())
        if previous is not None and previous.data.tags.get("pipeline.reusable", "true") == "true":
            logger.info("reusing FINISHED %s run %s (same parameters)", entry_point, previous.info.run_id)
            client.set_tag(parent.info.run_id, f"pipeline.{entry_point}.reused_run", previous.info.run_id)
            return previous
    logger.info("running entry point %s with %s", entry_point, parameters)
    submitted = mlflow.projects.run(
        str(PROJECT_DIR),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_id=experiment_id,
        synchronous=True,
    )
    run = client.get_run(submitted.run_id)
    if run.data.tags.get(MLFLOW_PARENT_RUN_ID) != parent.info.run_id:
        client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, parent.info.run_id)
    client.set_tag(parent.info.run_id, f"pipeline.{entry_point}.run", run.info.run_id)
    return run


def registered_version_of(client: MlflowClient, model_name: str, run_id: str) -> str:
    """The registry version that ``run_id`` created under ``model_name``."""
    versions = client.search_model_versions(
        f"name = {filter_literal(model_name)} and run_id = {filter_literal(run_id)}"
    )
    if not versions:
        raise RuntimeError(f"run {run_id} registered no version of model '{model_name}'")
    return max(versions, key=lambda v: int(v.version)).version


def start_parent_run(run_name: str = "pipeline") -> mlflow.ActiveRun:
    """Attach to the run ``mlflow run`` created for us, or start a new one in the default experiment."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    return mlflow.start_run(run_name=run_name)
