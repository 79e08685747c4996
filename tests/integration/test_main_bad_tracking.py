"""An unreachable MLFLOW_TRACKING_URI fails fast, naming the URI, both for our entry point and for `mlflow run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MLFLOW, MLFLOW_RUN_VARS, REPO, free_port

pytestmark = pytest.mark.e2e  # starts the entry points and `mlflow run`


def _env(uri: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        **extra,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in MLFLOW_RUN_VARS:
        env.pop(var, None)
    return env


def test_pipeline_entry_point_fails_fast_with_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.main", "--data-dir", str(tmp_path / "d")],
        cwd=REPO,
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert uri in proc.stderr and "not reachable" in proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "d").exists()


def test_mlflow_run_fails_fast_with_the_readme_setting(tmp_path):
    # MLflow's CLI creates the run before our code starts and retries for minutes by default; the README tells
    # users to set MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 for a fast, clear failure.
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = subprocess.run(
        [MLFLOW, "run", str(REPO), "--env-manager", "local", "-P", f"data_dir={tmp_path / 'd'}"],
        env=_env(uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert uri in proc.stderr
    assert time.monotonic() - start < 60
