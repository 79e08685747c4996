"""Four trainings at once against one tracking server, on PostgreSQL and on sqlite.

Each is ``python -m entrypoints.train`` on configs/tiny.yaml (2 steps, no workers) registering a version of the same
model. Expected: every run FINISHED, exact metric counts, 4 versions 1..4, and no lock error in any log. Measured
here (2 cores, 4 writers, 4 concurrent registrations of one model name): both backends pass, sqlite included. The
load is small (each run logs ~70 metric values in ~100 s, most of it start-up), so this shows no sqlite limit; its
known limit is one writer at a time (writes serialise on the database file lock; MLflow's server runs them in one
process here, --workers 1), which PostgreSQL does not have. The test prints the values/s it held.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, start_mlflow_server, stop_process
from mlflow import MlflowClient

from segmentation.data.preprocess import run_preprocess

pytestmark = pytest.mark.e2e

RUNS = 4
PG = "postgresql://postgres@127.0.0.1:5432"
START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
LOCK_ERRORS = re.compile(r"database is locked|deadlock detected|could not obtain lock|OperationalError", re.I)


def postgres_database(name: str) -> str:
    """Create a fresh database; fail with the start command when PostgreSQL is not running."""
    import psycopg2

    try:
        conn = psycopg2.connect(f"{PG}/postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({exc}); start it with `{START_PG}`")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the driver installed is psycopg2.
    return f"{PG.replace('postgresql://', 'postgresql+psycopg2://')}/{name}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("concurrency_data")
    run_preprocess("synthetic", "", out, num_images=5, height=64, width=128, val_fraction=0.2)
    return out


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_four_trainings_at_once(backend, data, tmp_path):
    name = f"concurrency_{uuid.uuid4().hex[:8]}"
    backend_uri = postgres_database(name) if backend == "postgresql" else None  # None: sqlite in tmp_path
    proc, uri, server_log = start_mlflow_server(tmp_path / "server", backend_uri)
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(var, None)
        started = time.monotonic()
        trainings = []
        for i in range(RUNS):
            log = tmp_path / f"train{i}.log"
            cmd = [sys.executable, "-m", "entrypoints.train", "--config", "configs/tiny.yaml", "--data", str(data),
                   "--experiment", name, "--registered-model", name,
                   "--overrides", f"train.epochs=0 train.max_steps=2 system.num_workers=0 "
                                  f"train.output_dir={tmp_path / f'out{i}'}"]
            trainings.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"),
                                               stderr=subprocess.STDOUT), log))
        codes = [p.wait(timeout=400) for p, _ in trainings]
        elapsed = time.monotonic() - started
        logs = [log.read_text() for _, log in trainings]
        for code, text in zip(codes, logs, strict=True):
            assert code == 0, text[-4000:]

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert len(runs) == RUNS and {r.info.status for r in runs} == {"FINISHED"}
        values = 0
        for run in runs:
            history = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                       for key in run.data.metrics}
            assert history["train/loss"] == [1, 2] and history["train/lr"] == [1, 2]
            assert history["val/mIoU"] == [2] and history["val/IoU/road"] == [2]
            assert sum(k.startswith("val/IoU/") for k in history) == 19
            values += sum(len(v) for v in history.values())
        versions = client.search_model_versions(f"name='{name}'")
        assert sorted(int(v.version) for v in versions) == list(range(1, RUNS + 1))
        assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
        for text in [*logs, server_log.read_text()]:
            assert not LOCK_ERRORS.search(text), LOCK_ERRORS.search(text).group(0)
        print(f"\n{backend}: {RUNS} concurrent runs FINISHED, {values} metric values + {RUNS} model versions "
              f"in {elapsed:.0f} s ({values / elapsed:.1f} values/s); no lock error")
    finally:
        stop_process(proc)
