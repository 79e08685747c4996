"""A parent that launches entry points (`main` through `mlflow run`, a training through `accelerate launch`) exits
with the code of the child that failed: 2 for bad input, 3 for an incomplete tracking record, not the launchers' 1."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from conftest import MLFLOW_RUN_VARS, REPO, child_env, sqlite_tracking_store

from segmentation.exit_codes import children_exit_code


@pytest.mark.parametrize(
    ("recorded", "launcher", "expected"),
    [
        ([], 0, 0),
        (["2", "2"], 1, 2),  # both ranks refused their input
        (["3", "0"], 1, 3),  # rank 0's tracking incomplete, rank 1 fine
        (["2", "1"], 1, 2),  # rank 0 refused its input, rank 1 lost its peer
        (["2", "3"], 1, 1),  # children disagree: unexpected
        ([], 1, 1),  # killed before recording
        ([], -9, 1),  # a signal
        (["x"], 1, 1),  # unreadable
    ],
)
def test_children_exit_code(tmp_path, recorded, launcher, expected):
    for i, text in enumerate(recorded):
        (tmp_path / f"{i}.code").write_text(text)
    assert children_exit_code(tmp_path, launcher) == expected


def child_run(uri: str, args: list[str]) -> subprocess.CompletedProcess:
    env = child_env(uri)
    for var in MLFLOW_RUN_VARS:
        env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_main_exits_with_the_code_of_the_step_that_failed(tmp_path):
    """A step refusing its input exits 2; the pipeline says which step and exits 2 too (not 1)."""
    args = ["entrypoints.main", "--dataset", "cityscapes", "--raw-dir", str(tmp_path / "no")]
    with sqlite_tracking_store(tmp_path) as uri:
        proc = child_run(uri, [*args, "--data-dir", str(tmp_path / "d"), "--config", "configs/tiny.yaml"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "step preprocess exited with code 2" in proc.stderr
        runs = mlflow.search_runs(search_all_experiments=True)
        assert sorted(runs["status"]) == ["FAILED", "FAILED"]  # the parent and its preprocess child


def test_a_training_on_two_ranks_exits_with_the_ranks_code(tmp_path):
    """Both ranks refuse a missing split table (exit 2); `accelerate launch` alone would make that 1."""
    args = ["entrypoints.train", "--config", "configs/tiny.yaml", "--data", str(tmp_path / "no_data")]
    with sqlite_tracking_store(tmp_path) as uri:
        proc = child_run(uri, [*args, "--num-processes", "2", "--registered-model", "", "--experiment", "x"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "split table not found" in proc.stderr
