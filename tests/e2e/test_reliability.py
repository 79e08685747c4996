"""Faults during training, with real processes: kill -9 and resume, a torn checkpoint, a tracking server that goes
away for a while, and one that stays away until the journal is synced by hand.

The kill -9 test needs no server of its own and uses the session's. The outage tests share one dedicated ``mlflow
server`` (sqlite), which they stop and start again on the same port and backend; it boots in the background while the
kill -9 test runs. Trainings are ``python -m entrypoints.train`` subprocesses on configs/tiny.yaml.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MLFLOW_RUN_VARS, REPO, start_mlflow_server, stop_process, train_command, wait_http
from mlflow import MlflowClient

from entrypoints import sync_tracking
from segmentation.data.preprocess import run_preprocess
from segmentation.mlops.journal_file import JOURNAL_FILE
from segmentation.training.checkpoint import list_checkpoints, load_weights

pytestmark = pytest.mark.e2e

EXPERIMENT = "reliability"


class Server:
    """A tracking server that can be stopped and started again on the same port, sqlite file and artifacts."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc, self.uri, self.log = start_mlflow_server(workdir, wait=False)
        self.port = int(self.uri.rsplit(":", 1)[1])

    def wait(self) -> Server:
        wait_http(f"{self.uri}/health", timeout=120, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def start(self) -> None:
        self.proc, uri, self.log = start_mlflow_server(self.workdir, port=self.port)
        assert uri == self.uri


@pytest.fixture(scope="module", autouse=True)
def booting_server(tmp_path_factory):
    """The outage tests' server, started (not awaited) with the module, so that it boots during the kill -9 test."""
    srv = Server(tmp_path_factory.mktemp("reliability_server"))
    yield srv
    srv.stop()


@pytest.fixture
def server(booting_server) -> Server:
    return booting_server.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability_data")
    run_preprocess("synthetic", "", out, num_images=5, height=64, width=128, val_fraction=0.2)  # 4 train, 1 val
    return out


def train(uri: str, data: Path, out: Path, overrides: str, *args: str) -> subprocess.Popen:
    # One thread each: the kill -9 test runs up to three trainings at once on 2 cores (the same count everywhere
    # also keeps float reductions, hence the weights compared bit for bit, identical between runs).
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    for var in MLFLOW_RUN_VARS:
        env.pop(var, None)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*train_command(data, EXPERIMENT, f"train.epochs=0 train.output_dir={out} {overrides}"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=(out / "log.txt").open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 300) -> int:
    return proc.wait(timeout=timeout)


def log_tail(out: Path) -> str:
    return (out / "log.txt").read_text()[-4000:]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, freeze: bool = False):
    """Poll ``predicate`` every 50 ms (a tiny step takes ~0.2 s here); ``freeze`` SIGSTOPs ``proc`` once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            if freeze:
                proc.send_signal(signal.SIGSTOP)
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout} s")


def run_dir(out: Path) -> Path | None:
    dirs = [p for p in out.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()]
    return dirs[0] if dirs else None


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_kill_9_then_resume_continues_the_run_exactly(mlflow_server, data, tmp_path):
    # Batch 1: 4 steps per epoch, so the checkpoint at step 6 is mid-epoch; augmentation stays random.
    overrides = "train.max_steps=8 train.val_every_n_steps=3 train.batch_size=1"
    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    client = MlflowClient(mlflow_server)
    if client.get_experiment_by_name(EXPERIMENT) is None:  # not left to two trainings starting at the same instant
        client.create_experiment(EXPERIMENT)
    full = train(mlflow_server, data, full_out, overrides)
    killed = train(mlflow_server, data, killed_out, overrides)
    second = wait_for(
        lambda: (d := run_dir(killed_out)) and (d / "checkpoints" / "step-0000006").is_dir() and d,
        timeout=240,
        what="2nd checkpoint",
        proc=killed,
    )
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    run_id = second.name
    # A kill during a save: a half-written checkpoint folder, and a torn last journal line.
    torn = second / "checkpoints" / ".tmp-step-0000009"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a"')
    with (second / "tracking" / JOURNAL_FILE).open("a") as fh:
        fh.write('{"kind": "metrics", "step": 99, "values": {"train/lo')
    assert [p.name for p in list_checkpoints(second / "checkpoints")][-1] == "step-0000006"

    resumed = train(mlflow_server, data, killed_out, overrides, "--resume", run_id)
    assert finish(resumed, killed_out) == 0, log_tail(killed_out)
    assert finish(full, full_out) == 0, log_tail(full_out)

    assert client.get_run(run_id).info.status == "FINISHED"
    full_id = run_dir(full_out).name
    assert steps(client, run_id, "train/loss") == list(range(1, 9)), "a step is missing or logged twice"
    assert steps(client, run_id, "val/mIoU") == [3, 6, 8]
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert losses == {m.step: m.value for m in client.get_metric_history(full_id, "train/loss")}
    final, reference = (load_weights(d / "checkpoints" / "step-0000008") for d in (second, run_dir(full_out)))
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0, msg=f"{key} differs after kill -9 + resume")


def journal_records(run: Path) -> list[dict]:
    lines = (run / "tracking" / JOURNAL_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def written_after(run: Path, moment: float) -> list[Path]:
    return [p for p in list_checkpoints(run / "checkpoints") if p.stat().st_mtime > moment]


def test_server_outage_loses_nothing_and_does_not_stop_training(server, data, tmp_path):
    out = tmp_path / "outage"
    proc = train(server.uri, data, out, "train.max_steps=12 train.val_every_n_steps=2 callbacks.checkpoint.top_k=30")
    # Frozen (SIGSTOP) at its first checkpoint while the server goes down, so that the outage starts at step 2
    # however fast the machine is.
    run = wait_for(
        lambda: (d := run_dir(out)) and list_checkpoints(d / "checkpoints") and d,
        timeout=240,
        what="first checkpoint",
        proc=proc,
        freeze=True,
    )
    try:
        server.stop()
        down = time.time()
        proc.send_signal(signal.SIGCONT)
        # Training goes on while the server is down: two more checkpoints, so that at least one whole step (its
        # metrics and its checkpoint) falls inside the outage. A training that waits for the server never gets there.
        wait_for(
            lambda: len(written_after(run, down)) >= 2, timeout=90, what="2 checkpoints during the outage", proc=proc
        )
    finally:
        proc.send_signal(signal.SIGCONT)
        server.start()
    up = time.time()
    assert finish(proc, out) == 0, log_tail(out)

    client = MlflowClient(server.uri)
    run_id = run.name
    assert client.get_run(run_id).info.status == "FINISHED"
    assert steps(client, run_id, "train/loss") == list(range(1, 13))
    during = [r for r in journal_records(run) if r["kind"] == "metrics" and down < r["timestamp"] / 1000 < up]
    assert during, "no metric was logged while the server was down: the outage missed the training"
    for record in during:
        for key, value in record["values"].items():
            logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            assert logged.get(record["step"]) == pytest.approx(value, nan_ok=True), f"{key}@{record['step']} lost"
    local = list_checkpoints(run / "checkpoints")
    assert any(down < p.stat().st_mtime < up for p in local), "no checkpoint written during the outage"
    uploaded = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "checkpoints")}
    assert uploaded == {p.name for p in local}


def test_server_down_for_good_exit_code_and_later_sync(server, data, tmp_path):
    out = tmp_path / "down"
    proc = train(
        server.uri,
        data,
        out,
        "train.max_steps=6 train.val_every_n_steps=2",
        "--tracking-timeout",
        "5",
        "--registered-model",
        "reliability-sync",
    )
    run = wait_for(
        lambda: (d := run_dir(out)) and list_checkpoints(d / "checkpoints") and d,
        timeout=240,
        what="first checkpoint",
        proc=proc,
        freeze=True,
    )  # frozen until the server is gone
    try:
        server.stop()
    finally:
        proc.send_signal(signal.SIGCONT)
    try:
        code = finish(proc, out)
        log = log_tail(out)
        assert code == 3, log  # entrypoints.train: EXIT_TRACKING_INCOMPLETE
        assert "python -m entrypoints.sync_tracking" in log and str(run / "tracking") in log
        assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "step-0000006"
        assert list((run / "models").glob("*/model.json"))  # the checkpoints' models wait on disk too
    finally:
        server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run.name).info.status == "RUNNING"  # the end itself is still in the journal
    sync = subprocess.run(
        [sys.executable, "-m", "entrypoints.sync_tracking", str(run / "tracking")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert sync.returncode == 0, sync.stdout + sync.stderr[-3000:]
    assert client.get_run(run.name).info.status == "FINISHED"
    assert steps(client, run.name, "train/loss") == list(range(1, 7))
    assert steps(client, run.name, "val/mIoU") == [2, 4, 6]
    (version,) = client.search_model_versions("name='reliability-sync'")
    assert version.run_id == run.name
    # Idempotent: a second sync (in this process: the same code without another interpreter start-up) adds nothing.
    assert sync_tracking.main([str(run)]) == 0 and steps(client, run.name, "train/loss") == list(range(1, 7))
