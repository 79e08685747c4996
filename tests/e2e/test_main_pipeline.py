"""`mlflow run .` (the `main` entry point): the whole pipeline as child runs of one parent, then a re-run reuses.

Reuse needs a clean git checkout of the project, which a developer's tree with edits is not: the pipeline runs from
a copy of the working tree (tracked and untracked files, not ignored ones) committed in a repository of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLFLOW, REPO, child_env
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT

pytestmark = pytest.mark.e2e

STEPS = ("preprocess", "train", "evaluate", "export", "promote")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The working tree, committed in a repository of its own."""
    copy = tmp_path_factory.mktemp("project")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    git = ["git", "-C", str(copy), "-c", "user.name=e2e", "-c", "user.email=e2e@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the working tree under test"]):
        subprocess.run([*git, *args], check=True)
    return copy


def run_main(project: Path, tracking_uri: str, params: dict[str, str]) -> float:
    env = child_env(tracking_uri)
    cmd = [MLFLOW, "run", str(project), "--env-manager", "local", "--experiment-name", "e2e-main"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"mlflow run . failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return time.monotonic() - start


def children_of(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, list]:
    runs = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
    by_step: dict[str, list] = {}
    for run in runs:
        by_step.setdefault(run.data.tags.get(MLFLOW_PROJECT_ENTRY_POINT), []).append(run)
    return by_step


def test_main_runs_every_step_as_child_runs_and_promotes(project, mlflow_server, tmp_path):
    params = {
        "data_dir": str(tmp_path / "data"),
        "config": "configs/tiny.yaml",
        "num_images": "10",
        "registered_model": "e2e-main",
        "overrides": f"train.output_dir={tmp_path / 'out'}",
    }
    run_main(project, mlflow_server, params)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e-main")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = 'main'")
    assert parent.info.status == "FINISHED"
    children = children_of(client, experiment.experiment_id, parent.info.run_id)
    assert sorted(children) == sorted(STEPS)
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in children.values())

    # The model the train step registered holds `production`, and the parent reports the mIoU evaluate measured.
    production = client.get_model_version_by_alias("e2e-main", "production")
    assert production.run_id == children["train"][0].info.run_id
    measured = children["evaluate"][0].data.metrics["eval/mIoU"]
    assert 0.0 <= measured <= 1.0
    assert parent.data.metrics["val/mIoU"] == pytest.approx(measured)
    onnx_versions = client.search_model_versions("name = 'e2e-main-onnx'")
    assert len(onnx_versions) == 1
    onnx_production = client.get_model_version_by_alias("e2e-main-onnx", "production")
    assert onnx_production.tags["source_model_version"] == production.version

    # Re-running with the same parameters reuses every finished step; only promotion runs again.
    run_main(project, mlflow_server, params)
    parents = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = 'main'",
        order_by=["attributes.start_time DESC"],
    )
    assert len(parents) == 2 and parents[0].info.status == "FINISHED"
    second = children_of(client, experiment.experiment_id, parents[0].info.run_id)
    assert sorted(second) == ["promote"]
    for step in ("preprocess", "train", "evaluate", "export"):
        assert parents[0].data.tags[f"pipeline.{step}.reused_run"] == children[step][0].info.run_id
    assert len(client.search_model_versions("name = 'e2e-main'")) == 1
