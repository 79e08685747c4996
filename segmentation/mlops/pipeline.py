"""Multistep runs: each step of the pipeline as a child run of one parent, reused when it already FINISHED.

This follows MLflow's multistep-workflow pattern: a parent run launches each entry point with
``mlflow.projects.run`` (each becomes a child run tagged ``mlflow.parentRunId``) and passes what one step made to
the next as parameters. A step that already FINISHED with the same parameters and the same code version is reused
instead of being run again, so re-running the pipeline after a failure redoes only what is missing.

"The same parameters" means every parameter of the entry point, compared as ``mlflow run`` logs them: the MLproject
default for each one the pipeline does not pass, values shell-quoted as MLflow quotes them. "The same code" means the
same git commit with no uncommitted change to a tracked file; without both, nothing is reused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException
from mlflow.projects._project_spec import load_project
from mlflow.projects.utils import get_git_commit
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

from segmentation.exit_codes import UNEXPECTED, children_exit_code, collect_exit_codes
from segmentation.mlops.registry import filter_literal

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the folder holding MLproject


EMPTY_AS_LOGGED = ("", "''")  # MLflow records an empty project parameter as the shell-quoted ``''``


class StepFailedError(RuntimeError):
    """A pipeline step's process failed; ``exit_code`` is its own (the entry points' exit-code table)."""

    def __init__(self, entry_point: str, detail: str, exit_code: int) -> None:
        super().__init__(f"step {entry_point} exited with code {exit_code} ({detail}); its log above says why")
        self.entry_point, self.exit_code = entry_point, exit_code


def logged_parameters(entry_point: str, parameters: dict[str, str]) -> dict[str, str]:
    """Every parameter of ``entry_point`` as ``mlflow run`` logs it for a launch given ``parameters``: MLflow's own
    computation (the MLproject default for each one not given, values shell-quoted: ``''``, ``'a b'``)."""
    spec = load_project(str(PROJECT_DIR)).get_entry_point(entry_point)
    final, extra = spec.compute_parameters(parameters, storage_dir=None)
    return {**final, **extra}


def _searchable(value: str) -> bool:
    """Whether a search filter can hold ``value``: not empty (see below) and without both quote characters (MLflow's
    filters have no escapes; ``shlex`` quotes ``a'b`` as ``'a'"'"'b'``)."""
    return value not in EMPTY_AS_LOGGED and not ("'" in value and '"' in value)


def _same_value(logged: str | None, expected: str) -> bool:
    if expected in EMPTY_AS_LOGGED:
        return logged is None or logged in EMPTY_AS_LOGGED
    return logged == expected


def find_finished_run(
    client: MlflowClient, experiment_id: str, entry_point: str, parameters: dict[str, str], git_commit: str
) -> Run | None:
    """The newest FINISHED run of ``entry_point`` at ``git_commit`` whose every parameter has the value a launch
    with ``parameters`` would log (:func:`logged_parameters`).

    Values a filter can hold are matched by the server's search, then every value is compared here: how an empty
    value is stored (``''`` or nothing) is not something a search filter can rely on.
    """
    expected = logged_parameters(entry_point, parameters)
    clauses = [
        f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = {filter_literal(entry_point)}",
        "attributes.status = 'FINISHED'",
        f"tags.`{MLFLOW_GIT_COMMIT}` = {filter_literal(git_commit)}",
    ]
    clauses += [f"params.`{key}` = {filter_literal(value)}" for key, value in expected.items() if _searchable(value)]
    runs = client.search_runs([experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"])
    for run in runs:
        if all(_same_value(run.data.params.get(key), value) for key, value in expected.items()):
            return run
    return None


def code_version(project_dir: Path = PROJECT_DIR) -> tuple[str | None, str]:
    """The git commit of the project and, when steps cannot be reused, why: not in a git checkout, project files
    the checkout does not track, or uncommitted changes to tracked files under the project folder (a run at that
    commit may have been made with other code or another config)."""
    commit = get_git_commit(str(project_dir))
    if commit is None:
        return None, "the project is not in a git checkout that git can read, so the code of earlier runs is unknown"
    import git  # GitPython, an MLflow dependency; only needed here

    repo = git.Repo(str(project_dir), search_parent_directories=True)
    try:
        repo.git.ls_files("--error-unmatch", "--", str(Path(project_dir).resolve() / "MLproject"))
    except git.GitCommandError:
        return commit, f"the git checkout at {repo.working_tree_dir} does not track the project's files"
    if repo.is_dirty(untracked_files=False, path=str(Path(project_dir).resolve())):
        return commit, "the working tree has uncommitted changes to tracked files"
    return commit, ""


def run_step(
    entry_point: str,
    parameters: dict[str, str],
    reuse: bool = True,
    differs: Callable[[Run], str | None] | None = None,
) -> tuple[Run, bool]:
    """Run one entry point as a child of the active run, or reuse a FINISHED run with the same parameters and code
    (and, with ``differs``, for which it returns None rather than why it differs); returns the run and whether it
    was reused.

    Raises:
        StepFailedError: the step's process failed (its exit code is kept).
    """
    client = MlflowClient()
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id
    parameters = {key: str(value) for key, value in parameters.items()}
    if reuse:
        commit, why_not = code_version()
        previous = None if why_not else find_finished_run(client, experiment_id, entry_point, parameters, commit)
        if previous is not None and differs is not None:
            why_not = differs(previous) or ""
            previous = None if why_not else previous
        if why_not:
            logger.info("not reusing an earlier %s run: %s", entry_point, why_not)
        elif previous is not None and previous.data.tags.get("pipeline.reusable", "true") == "true":
            logger.info("reusing FINISHED %s run %s (same parameters)", entry_point, previous.info.run_id)
            client.set_tag(parent.info.run_id, f"pipeline.{entry_point}.reused_run", previous.info.run_id)
            return previous, True
    logger.info("running entry point %s with %s", entry_point, parameters)
    with collect_exit_codes() as codes:
        try:
            submitted = mlflow.projects.run(
                str(PROJECT_DIR),
                entry_point=entry_point,
                parameters=parameters,
                env_manager="local",
                experiment_id=experiment_id,
                synchronous=True,
            )
        except ExecutionException as exc:  # MLflow says only "failed": the step recorded why, as its exit code
            raise StepFailedError(entry_point, str(exc), children_exit_code(codes, UNEXPECTED)) from None
    run = client.get_run(submitted.run_id)
    if run.data.tags.get(MLFLOW_PARENT_RUN_ID) != parent.info.run_id:
        client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, parent.info.run_id)
    client.set_tag(parent.info.run_id, f"pipeline.{entry_point}.run", run.info.run_id)
    return run, False


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
