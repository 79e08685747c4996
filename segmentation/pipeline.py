"""The whole pipeline as one MLflow run: preprocess -> train -> evaluate -> export -> promote as child runs.

This follows MLflow's multistep-workflow pattern: a parent run launches each entry point with
``mlflow.projects.run`` (each becomes a child run tagged ``mlflow.parentRunId``) and passes what one step made to
the next as parameters. A step that already FINISHED with the same parameters and the same code version is reused
instead of being run again, so re-running the pipeline after a failure redoes only what is missing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

from segmentation.registry import filter_literal

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PipelineParams:
    dataset: str = "synthetic"
    raw_dir: str = ""
    data_dir: str = "data/synthetic"
    config: str = "configs/synthetic.yaml"
    lr: float = 0.02
    registered_model: str = "fchardnet-synthetic"
    num_images: int = 200  # synthetic dataset only
    num_processes: int = 1
    overrides: str = ""
    reuse: bool = True


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
    from mlflow.projects.utils import get_git_commit

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


def run_pipeline(params: PipelineParams) -> dict[str, str]:
    """Run (or reuse) every step under the active parent run and return the ids it produced."""
    client = MlflowClient()
    data_dir = str(Path(params.data_dir).resolve())
    steps: dict[str, str] = {}

    preprocess_params = {"dataset": params.dataset, "raw_dir": params.raw_dir, "out_dir": data_dir}
    if params.dataset == "synthetic":
        preprocess_params["num_images"] = params.num_images
    prep = run_step("preprocess", preprocess_params, params.reuse and (Path(data_dir) / "split").is_dir())
    steps["preprocess"] = prep.info.run_id

    train = run_step(
        "train",
        {
            "config": params.config,
            "data": data_dir,
            "lr": params.lr,
            "num_processes": params.num_processes,
            "registered_model": params.registered_model,
            "overrides": params.overrides,
        },
        params.reuse,
    )
    steps["train"] = train.info.run_id
    version = registered_version_of(client, params.registered_model, train.info.run_id)
    model_uri = f"models:/{params.registered_model}/{version}"
    steps["model_uri"] = model_uri

    evaluation = run_step("evaluate", {"model_uri": model_uri, "data": data_dir, "split": "val"}, params.reuse)
    steps["evaluate"] = evaluation.info.run_id
    mlflow.log_metric("val/mIoU", evaluation.data.metrics.get("eval/mIoU", float("nan")))

    export = run_step(
        "export", {"model_uri": model_uri, "registered_model": f"{params.registered_model}-onnx"}, params.reuse
    )
    steps["export"] = export.info.run_id
    # The export is linked to its source version (tags source_model_name/version), so promoting that version
    # below also moves `production` on the ONNX model.
    onnx_version = registered_version_of(client, f"{params.registered_model}-onnx", export.info.run_id)
    steps["onnx_model_uri"] = f"models:/{params.registered_model}-onnx/{onnx_version}"

    # Promotion depends on the registry's current state, so it always runs.
    promote = run_step("promote", {"model_name": params.registered_model, "version": version}, reuse=False)
    steps["promote"] = promote.info.run_id
    mlflow.set_tags({f"pipeline.{key}": value for key, value in steps.items()})
    return steps


def start_parent_run(run_name: str = "pipeline") -> mlflow.ActiveRun:
    """Attach to the run ``mlflow run`` created for us, or start a new one in the default experiment."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    return mlflow.start_run(run_name=run_name)
