"""Resume only what may be resumed, once at a time, from a checkpoint that is whole: real trainings on tiny data
(configs/tiny.yaml, 64x128, CPU) against the session's real tracking server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import MLFLOW_RUN_VARS, REPO, train_command
from mlflow import MlflowClient

from segmentation.config_loading import CONFIG_DIR, load_config
from segmentation.mlops.locks import LockHeldError
from segmentation.mlops.run_guard import RUN_LOCK_TAG, run_lock
from segmentation.steps.evaluate import Protocol, evaluate_step
from segmentation.steps.train import train_step
from segmentation.training.checkpoint import STATE_FILE, WEIGHTS_FILE, list_checkpoints, load_weights

TINY = CONFIG_DIR / "tiny.yaml"
EXPERIMENT = "resume-safety"


def tiny_cfg(data: Path, out: Path, *overrides: str):
    """configs/tiny.yaml for 2 epochs = 4 steps, validating and checkpointing at steps 2 and 4 (both kept)."""
    return load_config(TINY, [f"data.root={data}", f"train.output_dir={out}", "train.epochs=2", *overrides])


def snapshot(client: MlflowClient, run_id: str) -> tuple:
    """What a refused resume must leave as it was: status, end time, params, tags, artifacts."""
    run = client.get_run(run_id)
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    return run.info.status, run.info.end_time, dict(run.data.params), dict(run.data.tags), artifacts


def test_resume_refuses_what_is_not_a_compatible_training_of_this_experiment_before_touching_it(
    tiny_data, tmp_path, tracking_uri, monkeypatch
):
    client = MlflowClient()
    cfg = tiny_cfg(tiny_data, tmp_path / "out")
    trained = train_step(cfg, experiment=EXPERIMENT, log_model=False)
    checkpoint = tmp_path / "out" / trained.run_id / "checkpoints" / "step-0000004"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)  # the evaluation's run goes into the same experiment
    evaluate_step(str(checkpoint), Protocol(data=str(tiny_data), num_worst=0))
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    evaluation = client.search_runs([experiment_id], "attributes.run_name = 'evaluate'")[0].info.run_id
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    with pytest.raises(ValueError, match="num_classes=7"):  # fails after its run started, before any config
        train_step(tiny_cfg(tiny_data, tmp_path / "out", "model.num_classes=7"), experiment=EXPERIMENT)
    early = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert early.info.status == "FAILED" and not early.data.params

    refusals = [
        (
            trained.run_id,
            cfg,
            "elsewhere",
            f"cannot resume run {trained.run_id}: it belongs to experiment "
            f"'{EXPERIMENT}' .* logs into experiment 'elsewhere'",
        ),
        (evaluation, cfg, EXPERIMENT, f"cannot resume run {evaluation}: it is not a training run"),
        (
            trained.run_id,
            tiny_cfg(tiny_data, tmp_path / "out", "optimizer.name=adamw"),
            EXPERIMENT,
            "cfg.optimizer.name: run has 'sgd', this config 'adamw'",
        ),
        (early.info.run_id, cfg, EXPERIMENT, f"cannot resume run {early.info.run_id}: it never logged its config"),
    ]
    for run_id, resume_cfg, experiment, message in refusals:
        before = snapshot(client, run_id)
        with pytest.raises(ValueError, match=message):
            train_step(resume_cfg, resume_run_id=run_id, experiment=experiment, log_model=False)
        assert snapshot(client, run_id) == before, f"refused resume of {run_id} ({message}) changed the run"
    assert client.get_experiment_by_name("elsewhere") is None  # a refused resume creates nothing either

    again = train_step(cfg, resume_run_id=trained.run_id, experiment=EXPERIMENT, log_model=False)
    assert again.run_id == trained.run_id and again.global_step == 4
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED" and RUN_LOCK_TAG not in run.data.tags  # released at the end


def _train_process(data: Path, uri: str, overrides: str, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    for var in MLFLOW_RUN_VARS:
        env.pop(var, None)
    cmd = [*train_command(data, EXPERIMENT, overrides, config=str(TINY)), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.e2e
def test_two_resumes_started_together_only_one_trains_and_a_dead_holder_frees_the_run(
    tiny_data, tmp_path, tracking_uri
):
    client = MlflowClient()
    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_data, out)
    run_id = train_step(cfg, experiment=EXPERIMENT, log_model=False).run_id
    # Resumed for many more steps (a compatible change), so that the one that trains is still at it when the other
    # is refused; no validation meanwhile, so no checkpoint is written.
    long = f"train.epochs=0 train.max_steps=100000 train.val_every_n_steps=100000 train.output_dir={out}"
    procs = [
        _train_process(tiny_data, tracking_uri, long, tmp_path / f"log{i}.txt", "--resume", run_id) for i in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        (loser,) = [i for i, p in enumerate(procs) if p.poll() is not None] or [None]
        assert loser is not None, "both resumes of one run are still training (neither was refused)"
        winner = procs[1 - loser]
        assert procs[loser].returncode == 2, (tmp_path / f"log{loser}.txt").read_text()[-3000:]
        message = (tmp_path / f"log{loser}.txt").read_text()
        assert f"cannot resume run {run_id}: another training of it is running" in message
        assert f"process {winner.pid} on" in message
        time.sleep(1.0)
        assert winner.poll() is None, (tmp_path / f"log{1 - loser}.txt").read_text()[-3000:]
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and json.loads(run.data.tags[RUN_LOCK_TAG])["pid"] == winner.pid
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
    # The holder died (kill -9: its lock tag stays): on the same host the lock is free at once.
    assert RUN_LOCK_TAG in client.get_run(run_id).data.tags
    resumed = train_step(cfg, resume_run_id=run_id, experiment=EXPERIMENT, log_model=False)
    assert resumed.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and RUN_LOCK_TAG not in run.data.tags


def test_run_lock_never_admits_two_of_many_simultaneous_takers(tracking_uri):
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_id = client.create_run(experiment_id).info.run_id
    takers = 8
    for attempt in range(3):
        barrier = threading.Barrier(takers)

        def take(_, barrier=barrier):
            lock = run_lock(MlflowClient(tracking_uri), run_id)
            barrier.wait()
            try:
                lock.try_acquire()
            except LockHeldError:
                return None
            return lock

        with ThreadPoolExecutor(takers) as pool:
            winners = [lock for lock in pool.map(take, range(takers)) if lock is not None]
        # Safety is the guarantee: never two holders. Eight writers on one sqlite store make the server retry
        # "database is locked", so a taker's write can land more than settle_s after the others: the documented
        # limit. Then every taker may back off, or the tag may end naming a taker that backed off while another
        # holds (its heartbeat reports the takeover); either way the tag names one of this round's takers.
        assert len(winners) <= 1, f"attempt {attempt}: {len(winners)} takers think they hold the lock"
        holder = json.loads(client.get_run(run_id).data.tags[RUN_LOCK_TAG])
        assert len(holder["owner"]) == 32 and holder["pid"] == os.getpid()  # written by one of these takers
        for winner in winners:
            winner.release()  # deletes the tag if it names the winner; stops its heartbeat either way
        if RUN_LOCK_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, RUN_LOCK_TAG)  # the documented manual release, so the next round starts free
        assert RUN_LOCK_TAG not in client.get_run(run_id).data.tags


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00" * path.stat().st_size)  # same size: only loading it finds the damage


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / WEIGHTS_FILE),
    "missing weights": lambda c: (c / WEIGHTS_FILE).unlink(),
    "corrupt trainer_state.json": lambda c: (c / STATE_FILE).write_text('{"global_step": 4, "epo'),
    "garbled optimizer.bin": lambda c: _garble(c / "optimizer.bin"),
}


def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before_it(tiny_data, tmp_path, tracking_uri, caplog):
    client = MlflowClient()
    cfg = tiny_cfg(tiny_data, tmp_path / "out")
    run_id = train_step(cfg, experiment=EXPERIMENT, log_model=False).run_id
    local = tmp_path / "out" / run_id / "checkpoints"
    final = {k: v.clone() for k, v in load_weights(local / "step-0000004").items()}  # not mmapped: damaged below
    for kind, damage in DAMAGE.items():
        damage(local / "step-0000004")
        caplog.clear()
        with caplog.at_level("WARNING"):
            resumed = train_step(cfg, resume_run_id=run_id, experiment=EXPERIMENT, log_model=False)
        assert "step-0000004" in caplog.text and ("damaged" in caplog.text or "cannot be loaded" in caplog.text), kind
        assert resumed.global_step == 4 and client.get_run(run_id).info.status == "FINISHED", kind
        again = load_weights(local / "step-0000004")  # trained again from step 2: the same weights, bit for bit
        for key, value in final.items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=f"{kind}: {key} differs")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]

    # Every local checkpoint damaged: the run's artifact copy of the newest one is downloaded instead.
    _truncate(local / "step-0000002" / WEIGHTS_FILE)
    _truncate(local / "step-0000004" / WEIGHTS_FILE)
    resumed = train_step(cfg, resume_run_id=run_id, experiment=EXPERIMENT, log_model=False)
    assert resumed.global_step == 4 and (local / ".damaged-step-0000004").is_dir()
    for key, value in final.items():
        torch.testing.assert_close(load_weights(local / "step-0000004")[key], value, rtol=0, atol=0)


def test_checkpoint_files_the_folder_and_its_rename_are_fsynced(tiny_data, tmp_path, tracking_uri, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync, and which file it was for
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    run_id = train_step(tiny_cfg(tiny_data, tmp_path / "out"), experiment=EXPERIMENT, log_model=False).run_id
    monkeypatch.undo()
    folder = tmp_path / "out" / run_id / "checkpoints"
    for checkpoint in list_checkpoints(folder):
        tmp = folder / f".tmp-{checkpoint.name}"
        files = sorted(p.name for p in checkpoint.iterdir())
        assert {WEIGHTS_FILE, STATE_FILE, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(files)
        for name in files:
            if name != STATE_FILE:  # written under a temporary name, fsynced, then renamed into the folder
                assert str(tmp / name) in synced, f"{checkpoint.name}/{name} was never fsynced"
        assert any(s.startswith(str(tmp / f".{STATE_FILE}.")) for s in synced), "trainer_state.json not fsynced"
        assert str(tmp) in synced, f"the folder {tmp.name} was not fsynced before its rename"
        last_file = max(i for i, s in enumerate(synced) if s.startswith(str(tmp)))
        assert str(folder) in synced[last_file + 1 :], f"the rename of {checkpoint.name} was not fsynced"
