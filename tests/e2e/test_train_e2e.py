"""`mlflow run . -e train` as a user runs it, against the session's real tracking server."""

from __future__ import annotations

import base64
import subprocess

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import MLFLOW, REPO, child_env
from mlflow import MlflowClient

from segmentation.mlops.serving_requests import encode_image

pytestmark = pytest.mark.e2e


def mlflow_run(tracking_uri: str, experiment: str, params: dict[str, str], timeout: float = 300):
    """Run the train entry point in a subprocess with the venv on PATH; returns the CompletedProcess."""
    env = child_env(tracking_uri)
    cmd = [MLFLOW, "run", str(REPO), "-e", "train", "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_mlflow_run_train_tracks_and_registers(tiny_data, tmp_path, mlflow_server):
    mlflow_run(
        mlflow_server,
        "e2e-train",
        {
            "config": "configs/tiny.yaml",
            "lr": "0.02",
            "data": str(tiny_data),
            "registered_model": "e2e-train-model",
            "overrides": f"train.epochs=2 train.output_dir={tmp_path / 'out'}",
        },
    )
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e-train")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.02" and run.data.params["cfg.train.lr"] == "0.02"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/mIoU")) == [2, 4]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]
    images = client.list_artifacts(run_id, "images")
    assert images, "no image logged"
    checkpoints = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert "checkpoints/step-0000004" in checkpoints
    (version,) = client.search_model_versions("name='e2e-train-model'")
    assert version.run_id == run_id
    assert {"val/mIoU", "run_id", "data_digest"} <= set(version.tags) and version.tags["run_id"] == run_id
    registered = client.get_registered_model("e2e-train-model")
    assert "Semantic segmentation (FC-HarDNet), 19 classes: road" in registered.description
    assert "/invocations" in registered.description
    assert registered.tags["task"] == "semantic-segmentation" and registered.tags["num_classes"] == "19"
    assert registered.tags["training_data_digest"] == version.tags["data_digest"]
    assert registered.tags["latest_version_run_id"] == run_id

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/e2e-train-model/{version.version}")
    image = cv2.imread(str(next((tiny_data / "images").rglob("*.png"))))
    out = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(out["mask"][0]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and mask.max() < 19
