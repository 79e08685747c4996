"""Sweeps with two worker processes (`python -m entrypoints.sweep`) sharing one Optuna study, on sqlite and on
PostgreSQL, tracked on the session's real MLflow server; and a worker killed with SIGKILL in the middle of a trial.

Each worker has its own parent run; every trial is one child run of the parent of the worker that ran it.
Trials are tiny: 2 steps on the session's 64x128 synthetic images, a validation after each step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import REPO, drop_postgres_db, make_postgres_db
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import TrialState

pytestmark = pytest.mark.e2e

# lr 1e-9 is hopeless: its val/mIoU stays at 0 while lr 0.2 reaches ~0.008 after one step, so the median pruner
# (armed after one complete trial, from the first validation on) prunes it.
SPACE = """\
params:
  train.lr: {type: categorical, choices: [0.2, 1e-9]}
  optimizer.weight_decay: {type: float, low: 1e-5, high: 1e-3, log: true}
pruner: {n_startup_trials: 1, n_warmup_steps: 0}
"""
TINY_TRIAL = (
    "train.epochs=1 train.max_steps=2 train.val_every_n_steps=1 train.sanity_val_batches=0 "
    "train.num_val_images_logged=0 train.log_every_n_steps=1"
)


class Sweep:
    """One study on one storage, its workers and the names it records under."""

    def __init__(self, tmp_path: Path, data: Path, storage: str, n_trials: int) -> None:
        self.tmp, self.data, self.storage, self.n_trials = tmp_path, data, storage, n_trials
        tag = uuid.uuid4().hex[:8]
        self.study, self.experiment, self.model = f"study-{tag}", f"sweep-{tag}", f"sweep-model-{tag}"
        self.space = tmp_path / "space.yaml"
        self.space.write_text(SPACE)
        self.workers: list[tuple[subprocess.Popen, Path]] = []

    def enqueue(self, *lrs: float) -> None:
        """Fix the first trials' lr (good ones first) so that pruning does not depend on the sampler's luck."""
        study = optuna.create_study(
            study_name=self.study, storage=self.storage, direction="maximize", load_if_exists=True
        )
        for lr in lrs:
            study.enqueue_trial({"train.lr": lr})

    def start_worker(self) -> subprocess.Popen:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        cmd = [
            sys.executable, "-m", "entrypoints.sweep",
            "--space", str(self.space), "--n-trials", str(self.n_trials),
            "--study", self.study, "--storage", self.storage,
            "--config", "configs/tiny.yaml", "--data", str(self.data),
            "--overrides", f"{TINY_TRIAL} train.output_dir={self.tmp / 'out'}",
            "--registered-model", self.model, "--experiment", self.experiment,
            "--heartbeat-interval", "1", "--grace-period", "4",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        self.workers.append((proc, log))
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 420) -> None:
        log = next(log for p, log in self.workers if p is proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"worker did not finish within {timeout} s:\n{log.read_text()[-4000:]}")
        assert code == 0, f"worker exited with {code}:\n{log.read_text()[-4000:]}"

    def stop_all(self) -> None:
        for proc, _ in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    def runs(self, client: MlflowClient) -> tuple[dict, dict]:
        """``({parent run id: run}, {trial number: [child runs]})`` of this sweep."""
        experiment = client.get_experiment_by_name(self.experiment)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        parents = {r.info.run_id: r for r in runs if r.data.tags.get("sweep.worker")}
        children: dict[int, list] = {}
        for run in runs:
            if "sweep.trial" in run.data.tags:
                children.setdefault(int(run.data.tags["sweep.trial"]), []).append(run)
        return parents, children

    def load_study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study, storage=self.storage)


def history(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "val/mIoU")}


def check_shared_study(sweep: Sweep, client: MlflowClient) -> None:
    study = sweep.load_study()
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Two workers deciding at the same instant may both start the last trial: at most one extra.
    assert sweep.n_trials <= len(finished) == len(trials) <= sweep.n_trials + 1, [t.state for t in trials]
    parents, children = sweep.runs(client)
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents.values())
    assert sorted(children) == [t.number for t in trials], "every trial is one child run, no trial twice"
    for trial in trials:
        (run,) = children[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"] and run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags[MLFLOW_PARENT_RUN_ID] in parents
        assert float(run.data.params["cfg.train.lr"]) == trial.params["train.lr"]
        assert history(client, run.info.run_id) == pytest.approx(trial.intermediate_values)
        expected = ("KILLED", "pruned") if trial.state == TrialState.PRUNED else ("FINISHED", "complete")
        assert (run.info.status, run.data.tags["sweep.state"]) == expected
    # Every hopeless trial is pruned (the enqueued third at least); a good one may be too, when its first score is
    # below the median of the complete ones (weight decay varies).
    hopeless = [t for t in trials if t.params["train.lr"] == 1e-9]
    assert hopeless and all(t.state == TrialState.PRUNED for t in hopeless)
    best = study.best_trial
    (version,) = client.search_model_versions(f"name = '{sweep.model}'")
    assert version.run_id == best.user_attrs["mlflow_run_id"] and version.tags["sweep.study"] == sweep.study
    owner = parents[best.user_attrs["mlflow_parent_run_id"]]
    assert owner.data.metrics["best/val/mIoU"] == pytest.approx(best.value)
    assert float(owner.data.params["best.train.lr"]) == 0.2
    files = {a.path for a in client.list_artifacts(owner.info.run_id, "sweep")}
    expected_files = {"trials.csv", "trials.json", "space.yaml", "top_trials.png"}
    expected_files |= {"optimization_history.png", "param_importances.png", "parallel_coordinate.png"}
    assert {f"sweep/{name}" for name in expected_files} <= files


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(backend, tiny_data, tmp_path, tracking_uri):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else make_postgres_db("optuna_sweep")
    sweep = Sweep(tmp_path, tiny_data, storage, n_trials=6 if backend == "sqlite" else 4)
    try:
        sweep.enqueue(0.2, 0.2, 1e-9)
        first, second = sweep.start_worker(), sweep.start_worker()
        sweep.wait(first)
        sweep.wait(second)
        check_shared_study(sweep, MlflowClient())
    finally:
        sweep.stop_all()
        if backend == "postgresql":
            drop_postgres_db(storage)


def test_a_killed_workers_trial_fails_and_the_other_worker_finishes_the_study(tiny_data, tmp_path, tracking_uri):
    sweep = Sweep(tmp_path, tiny_data, f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=3)
    client = MlflowClient()
    try:
        survivor, victim = sweep.start_worker(), sweep.start_worker()
        deadline = time.monotonic() + 300
        killed = None
        while killed is None and time.monotonic() < deadline:  # kill the victim once one of its trials trains
            time.sleep(0.3)
            if client.get_experiment_by_name(sweep.experiment) is None:
                continue
            parents, children = sweep.runs(client)
            mine = {pid for pid, p in parents.items() if p.data.tags["sweep.worker"].endswith(f":{victim.pid}")}
            for number, (run,) in children.items():
                # fit tags the run once model, data and optimizer are built, just before the first step
                training = run.info.status == "RUNNING" and "segmentation.checkpoint_dir" in run.data.tags
                if run.data.tags[MLFLOW_PARENT_RUN_ID] in mine and training:
                    os.killpg(victim.pid, signal.SIGKILL)
                    victim.wait(timeout=30)
                    killed = (number, run.info.run_id, run.data.tags[MLFLOW_PARENT_RUN_ID])
                    break
        assert killed is not None, "the victim never started training a trial"
        sweep.wait(survivor)
    finally:
        sweep.stop_all()
    number, run_id, parent_id = killed
    study = sweep.load_study()
    states = {t.number: t.state for t in study.get_trials()}
    assert states[number] == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states.values()) >= sweep.n_trials
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["sweep.state"]) == ("FAILED", "failed")
    assert "no heartbeat" in run.data.tags["sweep.failure"]
    assert client.get_run(parent_id).info.status == "FAILED"  # the dead worker's parent run is closed too
    (version,) = client.search_model_versions(f"name = '{sweep.model}'")
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
