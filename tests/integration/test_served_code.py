"""A logged model carries the ``segmentation`` code that serving imports, and nothing else, and predicts from it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from conftest import random_bn_model, tracking_store

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.mlops.model_store import CODE_DIR, log_pytorch_model, served_code_files
from segmentation.mlops.serving_requests import encode_image

CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))


# Loads the logged model in a process where the repository's `segmentation` cannot be found: this venv's editable
# install (a meta-path finder) is removed and the working directory is elsewhere, so every module must come from
# the model's own code folder. Prints the masks' shapes and where each loaded `segmentation` module came from.
def _mask(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


PROBE = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
request = pd.read_json(sys.argv[2], orient="split")
masks = model.predict(request)
files = sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "segmentation")
print(json.dumps({"masks": masks["mask"].tolist(), "files": files}))
"""


def test_the_code_logged_with_a_model_is_the_closure_of_what_serving_imports():
    files = {path.as_posix() for path in served_code_files()}
    for needed in ("mlops/serving_model.py", "mlops/serving.py", "inference/predictor.py", "models/hardnet.py"):
        assert f"segmentation/{needed}" in files
    assert "segmentation/__init__.py" in files and "segmentation/models/__init__.py" in files
    assert not [f for f in files if f.split("/")[1] in ("training", "steps")], sorted(files)
    assert len(files) < len(list(CODE_DIR.rglob("*.py")))


def test_a_logged_model_predicts_from_its_own_code_alone(tmp_path):
    with tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}"), mlflow.start_run():
        info = log_pytorch_model(random_bn_model(CLASSES.num_classes), CLASSES, ModelConfig(num_classes=3))
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    logged = {p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py")}
    assert logged == {path.as_posix() for path in served_code_files()}

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (70, 66, 3), dtype=np.uint8)]
    request = tmp_path / "request.json"
    request.write_text(pd.DataFrame({"image": [encode_image(i) for i in images]}).to_json(orient="split"))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(local), str(request)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["files"] and all(f.startswith(str(local / "code")) for f in answer["files"]), answer["files"]
    expected = mlflow.pyfunc.load_model(str(local)).predict(pd.read_json(request, orient="split"))
    for got, want, image in zip(answer["masks"], expected["mask"], images, strict=True):
        np.testing.assert_array_equal(_mask(got), _mask(want))
        assert _mask(got).shape == image.shape[:2]
