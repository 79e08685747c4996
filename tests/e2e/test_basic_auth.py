"""MLflow's basic-auth app in front of the tracking server: strangers get 401, the pipeline with credentials works.

The server runs as docs/team.md says (`--app-name basic-auth`, an ini file named by MLFLOW_AUTH_CONFIG_PATH, the
admin password from MLFLOW_AUTH_ADMIN_PASSWORD, a static MLFLOW_FLASK_SERVER_SECRET_KEY) and binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import MLFLOW_RUN_VARS, REPO, start_mlflow_server, stop_process, train_command
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

pytestmark = pytest.mark.e2e

ADMIN = ("admin", "admin-password-for-tests")  # the auth app rejects passwords shorter than 12 characters
ALICE = ("alice", "alice-password-for-tests")
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth tracking server (sqlite for runs and users, proxied artifacts); yields (uri, port)."""
    workdir = tmp_path_factory.mktemp("auth_server")
    ini = workdir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    with pytest.MonkeyPatch.context() as mp:  # read by the server process at start-up only
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
        mp.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN[1])
        mp.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "a-static-secret-for-csrf")
        proc, uri, _ = start_mlflow_server(workdir, extra=["--app-name", "basic-auth"])
    yield uri, int(uri.rsplit(":", 1)[1])
    stop_process(proc)


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


def train(uri: str, data: Path, out: Path, experiment: str, registered_model: str = "") -> subprocess.Popen:
    """A 1-step ``python -m entrypoints.train`` with this process's environment (credentials included).

    One step and one validation (what the auth tests need: a run, metrics, artifacts, a model, a registration).
    """
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_RUN_VARS}
    overrides = "train.epochs=0 train.max_steps=1 train.val_every_n_steps=1 train.sanity_val_batches=0"
    cmd = train_command(data, experiment, f"{overrides} train.output_dir={out}", registered_model)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def status_of(url: str, credentials: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def use_credentials(monkeypatch, credentials: tuple[str, str] | None) -> None:
    """Set (or clear) the env vars every MLflow client, ours included, reads its credentials from."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    for var, value in zip(names, credentials or (None, None), strict=True):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


def test_unauthenticated_clients_are_refused(auth_server, data, monkeypatch, tmp_path):
    uri, _ = auth_server
    use_credentials(monkeypatch, None)
    proc = train(uri, data, tmp_path, "auth-refused")  # checked last: it runs while the requests below are made
    assert status_of(uri + "/health") == 200  # load balancers may probe without credentials
    assert status_of(uri + SEARCH) == 401
    assert status_of(uri + SEARCH, (ADMIN[0], "wrong-password-123")) == 401
    assert status_of(uri + SEARCH, ADMIN) == 200

    with pytest.raises(MlflowException, match="401"):
        MlflowClient(uri).search_experiments()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "401" in stderr, stderr[-3000:]
    use_credentials(monkeypatch, ADMIN)
    assert MlflowClient(uri).get_experiment_by_name("auth-refused") is None  # nothing was written


def test_pipeline_with_credentials_is_tracked_and_registered(auth_server, data, monkeypatch, tmp_path):
    uri, _ = auth_server
    use_credentials(monkeypatch, ADMIN)
    AuthServiceClient(uri).create_user(*ALICE)

    # A plain training makes every call `mlflow run` would (run, metrics, artifacts, model, registration) with
    # the credentials from the environment; `mlflow run` itself is covered by test_train_e2e.
    use_credentials(monkeypatch, ALICE)
    proc = train(uri, data, tmp_path / "out", "auth-team", registered_model="auth-m")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("auth-team").experiment_id])
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "val/mIoU")
    (version,) = client.search_model_versions("name='auth-m'")
    assert version.run_id == run.info.run_id
    # The creator owns what it made: the auth app granted alice MANAGE on the registered model.
    use_credentials(monkeypatch, ADMIN)
    permission = AuthServiceClient(uri).get_user_permission(ALICE[0], "registered_model", "auth-m")
    assert permission.permission == "MANAGE", permission.to_json()


def test_server_listens_on_loopback_only(auth_server):
    _, port = auth_server
    listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, f"port {port} listens on {listening}; a shared server needs --host explicitly"
