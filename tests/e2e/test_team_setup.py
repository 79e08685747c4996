"""The team setup: `mlflow server` on PostgreSQL with a proxied artifact store; a training lands in both.

PostgreSQL must run on 127.0.0.1:5432 (trust auth, user postgres); when it does not, these tests fail and say how
to start it. Each session gets its own database, dropped afterwards.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg2
import pytest
from conftest import (
    PG_START_HINT,
    REPO,
    child_env,
    drop_postgres_db,
    free_port,
    make_postgres_db,
    start_mlflow_server,
    stop_process,
    train_command,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postgres_uri() -> str:
    uri = make_postgres_db("team_setup")
    yield uri
    drop_postgres_db(uri)


@pytest.fixture(scope="module")
def team_server(postgres_uri, tmp_path_factory):
    """`mlflow server --backend-store-uri postgresql://... --artifacts-destination <dir>`; yields (uri, dir)."""
    workdir = tmp_path_factory.mktemp("team_server")
    proc, uri, _ = start_mlflow_server(workdir, backend_uri=postgres_uri)
    yield uri, workdir / "mlartifacts"
    stop_process(proc)


def train(
    tracking_uri: str,
    data: Path,
    output_dir: Path,
    registered_model: str,
    experiment: str,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m entrypoints.train` on the tiny recipe with MLFLOW_TRACKING_URI set, as a team member runs it."""
    env = child_env(tracking_uri, **(extra_env or {}))
    cmd = train_command(data, experiment, f"train.epochs=2 train.output_dir={output_dir}", registered_model)
    # 4 images, batch 2: 4 steps
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)


def query(postgres_uri: str, sql: str, *args) -> list[tuple]:
    with psycopg2.connect(postgres_uri.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    conn.close()
    return rows


def local_path(artifacts_root: Path, uri: str) -> Path:
    """Where the proxied store keeps ``mlflow-artifacts:/<path>`` on the server's disk."""
    assert uri.startswith("mlflow-artifacts:/"), f"artifacts are not proxied: {uri}"
    return artifacts_root / uri.removeprefix("mlflow-artifacts:").lstrip("/")


def test_training_run_and_registered_model_live_in_postgres_and_proxied_store(
    team_server, postgres_uri, tmp_path, tiny_data
):
    tracking_uri, artifacts_root = team_server
    data = tiny_data
    proc = train(tracking_uri, data, tmp_path / "out", "team-m", "team-setup")
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stderr[-5000:]}"

    (experiment_id,) = query(postgres_uri, "SELECT experiment_id FROM experiments WHERE name = %s", "team-setup")[0]
    runs = query(
        postgres_uri, "SELECT run_uuid, status, artifact_uri FROM runs WHERE experiment_id = %s", experiment_id
    )
    assert len(runs) == 1, runs
    run_id, status, artifact_uri = runs[0]
    assert status == "FINISHED"
    steps = query(
        postgres_uri, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step", run_id
    )
    assert [s for (s,) in steps] == [1, 2, 3, 4]
    assert query(postgres_uri, "SELECT value FROM params WHERE run_uuid = %s AND key = 'cfg.train.lr'", run_id) == [
        ("0.02",)
    ]
    assert query(postgres_uri, "SELECT key FROM latest_metrics WHERE run_uuid = %s AND key = 'val/mIoU'", run_id)

    versions = query(
        postgres_uri, "SELECT version, run_id, status, storage_location FROM model_versions WHERE name = 'team-m'"
    )
    assert len(versions) == 1, versions
    version, version_run_id, version_status, storage_location = versions[0]
    assert (version, version_run_id, version_status) == (1, run_id, "READY")

    # Artifacts went through the server into --artifacts-destination: the run's files and the model's MLmodel.
    run_dir = local_path(artifacts_root, artifact_uri)
    assert run_dir == artifacts_root / str(experiment_id) / run_id / "artifacts"
    assert any((run_dir / "checkpoints").iterdir()), f"no checkpoint uploaded under {run_dir}"
    assert (local_path(artifacts_root, storage_location) / "MLmodel").is_file()


def test_postgres_down_fails_with_the_command_that_starts_it():
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is not running") as failure:
        make_postgres_db(port=free_port())  # nothing listens there: the same path as a stopped cluster
    assert PG_START_HINT in str(failure.value)
