"""Four trainings at once against one tracking server, on PostgreSQL and on sqlite.

Each is ``python -m entrypoints.train`` on configs/tiny.yaml (1 step and its validation, no workers, one thread each
so that four processes share the 2 cores without oversubscription) registering a version of the same model, in an
experiment none of them finds at start (they race to create it). Expected: every run FINISHED, exact metric counts,
4 versions 1..4, and no lock error in any log. Measured here (2 cores, 4 writers, 4 concurrent registrations of one
model name): both backends pass, sqlite included. The load is small (each run logs 25 metric values in ~30 s, most
of it start-up), so this shows no sqlite limit; its known limit is one writer at a time (writes serialise on the
database file lock; MLflow's server runs them in one process here, --workers 1), which PostgreSQL does not have.
The test prints the values/s it held.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    child_env,
    drop_postgres_db,
    make_postgres_db,
    start_mlflow_server,
    stop_process,
    train_command,
    wait_http,
)
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

RUNS = 4
BACKENDS = ("postgresql", "sqlite")
LOCK_ERRORS = re.compile(r"database is locked|deadlock detected|could not obtain lock|OperationalError", re.I)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One tracking server per backend, both started at once (the second boots while the first test runs).

    Yields ``{backend: (process, uri, log)}``; PostgreSQL's entry is the ``pytest.fail`` message when it is not
    running, so that only its own test fails.
    """
    started, databases = {}, []
    try:
        for backend in BACKENDS:
            workdir = tmp_path_factory.mktemp(f"concurrency_{backend}")
            backend_uri = None  # sqlite in workdir
            if backend == "postgresql":
                try:
                    backend_uri = make_postgres_db("concurrency")
                except pytest.fail.Exception as exc:
                    started[backend] = str(exc)
                    continue
                databases.append(backend_uri)
            started[backend] = start_mlflow_server(workdir, backend_uri, wait=False)
        yield started
    finally:
        for server in started.values():
            if not isinstance(server, str):
                stop_process(server[0])
        for uri in databases:
            drop_postgres_db(uri)


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_trainings_at_once(backend, servers, data, tmp_path):
    if isinstance(servers[backend], str):
        pytest.fail(servers[backend])
    proc, uri, server_log = servers[backend]
    wait_http(f"{uri}/health", timeout=120, proc=proc, log=server_log)
    name = f"concurrency_{backend}"
    env = child_env(uri, OMP_NUM_THREADS="1")
    started = time.monotonic()
    trainings = []
    for i in range(RUNS):
        log = tmp_path / f"train{i}.log"
        overrides = (
            "train.epochs=0 train.max_steps=1 train.val_every_n_steps=1 train.sanity_val_batches=0 "
            f"system.num_workers=0 train.output_dir={tmp_path / f'out{i}'}"
        )
        cmd = train_command(data, name, overrides, registered_model=name)
        trainings.append(
            (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), log)
        )
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
        history = {
            key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics
        }
        assert history["train/loss"] == [1] and history["train/lr"] == [1]
        assert history["val/mIoU"] == [1] and history["val/IoU/road"] == [1]
        assert sum(k.startswith("val/IoU/") for k in history) == 19
        values += sum(len(v) for v in history.values())
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, RUNS + 1))
    assert {v.run_id for v in versions} == {r.info.run_id for r in runs}
    for text in [*logs, server_log.read_text()]:
        assert not LOCK_ERRORS.search(text), LOCK_ERRORS.search(text).group(0)
    print(
        f"\n{backend}: {RUNS} concurrent runs FINISHED, {values} metric values + {RUNS} model versions "
        f"in {elapsed:.0f} s ({values / elapsed:.1f} values/s); no lock error"
    )
