"""A registered model serves in the environment MLflow builds from the model itself, not in this venv.

``mlflow models serve --env-manager virtualenv`` creates a virtualenv from the model's ``python_env.yaml`` and
``requirements.txt`` (pyenv for the Python version, pip for the packages, from this machine's package sources) and
runs the pyfunc there: a requirement missing from the model, or one that cannot be installed (a local version label
such as ``+cpu``), fails here. The server runs outside the repository and that environment has no ``segmentation``
installed, so every module it imports comes from the code logged with the model: one missing there fails here too.
MLflow caches the environment by its requirements (``MLFLOW_ENV_ROOT``), so only the first run on a machine pays
for the install (~3-5 minutes here, most of it the torch wheel).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import MLFLOW, child_env, free_port, new_sqlite_store, random_bn_model, stop_process, wait_http

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.mlops.model_store import log_pytorch_model, served_code_files
from segmentation.mlops.serving_requests import encode_image

pytestmark = pytest.mark.e2e


def _mask(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


def test_the_model_serves_the_same_masks_from_its_own_virtualenv(tmp_path, monkeypatch):
    if shutil.which("pyenv") is None and not (tmp_path.home() / ".pyenv" / "bin" / "pyenv").is_file():
        pytest.fail("pyenv is not installed: MLflow's virtualenv environment manager needs it for the Python version")
    uri = new_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    classes = ClassInfo.cityscapes()
    with mlflow.start_run():
        info = log_pytorch_model(random_bn_model(classes.num_classes), classes, ModelConfig())
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model"))
    code = Path(local) / "code"
    assert {p.relative_to(code) for p in code.rglob("*.py")} == set(served_code_files())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (70, 66, 3), dtype=np.uint8)]
    request = pd.DataFrame({"image": [encode_image(image) for image in images]})
    env = child_env(uri)
    env["PATH"] = f"{tmp_path.home() / '.pyenv' / 'bin'}:{env['PATH']}"
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [MLFLOW, "models", "serve", "-m", local, "--env-manager", "virtualenv", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        # The first run on a machine builds the environment (pyenv's Python, pip from this machine's sources).
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=1500, proc=proc, log=log)
        body = json.dumps({"dataframe_split": request.to_dict(orient="split")}).encode()
        call = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(call, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        stop_process(proc)
    served_from = log.read_text()
    assert (
        "virtualenv" in served_from or "Creating a new environment" in served_from or "already exists" in served_from
    )
    predictions = answer["predictions"]
    expected = mlflow.pyfunc.load_model(local).predict(request)
    assert len(predictions) == len(images)
    for got, want, image in zip(predictions, expected["mask"], images, strict=True):
        assert (got["height"], got["width"]) == image.shape[:2]
        np.testing.assert_array_equal(_mask(got["mask"]), _mask(want))
