"""Two real gloo ranks on CPU through `mlflow run ... -P num_processes=2` (re-launched with accelerate launch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_train_e2e import mlflow_run

from segmentation.training.checkpoint import list_checkpoints

pytestmark = pytest.mark.e2e


def test_two_cpu_ranks_one_run_each_step_once(tmp_path, mlflow_server, tiny_data):
    data = tiny_data
    # 4 train images, batch 2 per rank, 2 ranks: 1 step per epoch; 4 epochs = 4 steps.
    proc = mlflow_run(
        mlflow_server,
        "e2e-2proc",
        {
            "config": "configs/tiny.yaml",
            "data": str(data),
            "num_processes": "2",
            "registered_model": "",
            "overrides": f"train.epochs=4 train.output_dir={tmp_path / 'out'}",
        },
    )
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and "rank 1/2" in log, log[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e-2proc").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["segmentation.num_processes"] == "2"
    for key in ("train/loss", "train/lr", "val/mIoU"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {sorted(steps)}"
    lr = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/lr"))
    # One scheduler step per optimizer step, whatever the number of ranks (Accelerate's default would take two).
    assert [s for s, _ in lr] == [1, 2, 3, 4]
    assert all(math.isclose(v, 0.02 * (1 - (s - 1) / 4) ** 0.9, rel_tol=1e-6) for s, v in lr)
    kept = list_checkpoints(Path(tmp_path / "out" / run.info.run_id / "checkpoints"))
    assert (kept[-1] / "random_states_1.pkl").is_file()  # rank 1 took part in save_state
