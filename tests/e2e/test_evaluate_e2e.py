"""`mlflow run . -e evaluate` as a user runs it: a registered model, a synthetic split, the session's server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.data.preprocess import run_preprocess
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.models import FCHarDNet

BIN = Path(sys.executable).parent


@pytest.mark.e2e
def test_mlflow_run_evaluate_logs_links_and_promotes(repo, tracking_uri, tmp_path):
    data = tmp_path / "data"
    run_preprocess("synthetic", "", data, num_images=4, height=64, width=128, val_fraction=0.5)
    name = f"e2e-eval-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(name)
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_pytorch_model(
            FCHarDNet(num_classes=19), ClassInfo.cityscapes(), ModelConfig(), registered_model_name=name
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    cmd = [
        shutil.which("mlflow", path=str(BIN)) or "mlflow",
        "run",
        str(repo),
        "-e",
        "evaluate",
        "--env-manager",
        "local",
        "--experiment-id",
        experiment_id,
        "-P",
        f"model_uri=models:/{name}/{info.registered_model_version}",
        "-P",
        f"data={data}",
        "-P",
        "num_worst=1",
        "-P",
        "promote=true",
        "-P",
        "device=cpu",
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mIoU" in proc.stdout and "ms/image" in proc.stdout and "PROMOTED" in proc.stdout

    (run,) = client.search_runs([experiment_id], filter_string=f"tags.model_name = '{name}'")
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["eval/mIoU"] <= 1.0 and run.data.metrics["eval/latency_ms_per_image"] > 0
    assert run.data.tags["model_version"] == str(info.registered_model_version)
    assert run.data.params["promote"] == "true"  # logged by `mlflow run` itself, not re-logged by us
    assert client.get_registered_model(name).aliases == {"production": str(info.registered_model_version)}
    assert (
        client.get_model_version(name, str(info.registered_model_version)).tags["promoted_by_run"] == run.info.run_id
    )
