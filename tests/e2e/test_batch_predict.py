"""`batch_predict` on a real local Spark (local[2]) with a registered model: the same masks as the pyfunc in-process.

Spark needs Java: without it these tests fail (never skip) with a message that says so.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MLFLOW_RUN_VARS, REPO, sqlite_tracking_store, tracking_store
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.data.synthetic import generate_scene
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.models import FCHarDNet
from segmentation.steps.batch_predict import PIXELS_PREFIX, TABLE_FILE, batch_predict_step

pytestmark = pytest.mark.e2e

MODEL = "batch-e2e"
CLASSES = ClassInfo(
    ("road", "sky", "car", "traffic light"), ((128, 64, 128), (70, 130, 180), (0, 0, 142), (250, 170, 30))
)
LABEL_IDS = np.array([7, 23, 26, 19], dtype=np.uint8)  # CLASSES as Cityscapes label ids, written out here
SIZES = [(64, 96), (48, 128), (128, 128), (70, 90), (96, 64)]
NUM_IMAGES = 20  # 19 images and one corrupt file


@pytest.fixture(scope="module")
def java() -> str:
    java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).is_file():
        pytest.fail("batch_predict runs Spark, which needs Java 17+: no `java` on PATH and no JAVA_HOME. Install one.")
    return java


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A sqlite store holding a small random FC-HarDNet registered as `batch-e2e` with alias `production`."""
    with sqlite_tracking_store(tmp_path_factory.mktemp("store")) as uri:
        torch.manual_seed(0)
        model = FCHarDNet(num_classes=CLASSES.num_classes).eval()
        with mlflow.start_run():
            info = log_pytorch_model(
                model, CLASSES, ModelConfig(num_classes=CLASSES.num_classes), registered_model_name=MODEL
            )
        MlflowClient().set_registered_model_alias(MODEL, "production", info.registered_model_version)
    return uri


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """19 synthetic scenes (PNG and JPEG, nested, 48-128 px), one truncated PNG and one text file."""
    root = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES - 1):
        image, _ = generate_scene(*SIZES[i % len(SIZES)], seed=i)
        folder = root / ("city_b" if i % 3 else "city_a")
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"frame_{i:02d}.{'jpg' if i % 4 == 0 else 'png'}"), image)
    good = (root / "city_a" / "frame_03.png").read_bytes()
    (root / "city_a" / "broken.png").write_bytes(good[: len(good) // 2])  # a valid header, then cut off
    (root / "notes.txt").write_text("not an image")
    return root


def in_process(store: str, paths: list[Path]) -> pd.DataFrame:
    """The registered model's pyfunc, loaded in this process, on the same files (colorize on)."""
    with tracking_store(store):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    request = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    return model.predict(request, params={"colorize": True})


def png(text_or_path: str | Path) -> np.ndarray:
    data = Path(text_or_path).read_bytes() if isinstance(text_or_path, Path) else base64.b64decode(text_or_path)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_mlflow_run_batch_predict_matches_in_process_pyfunc(java, store, images, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for var in (*MLFLOW_RUN_VARS, "PYSPARK_PYTHON"):
        env.pop(var, None)
    params = {
        "model_uri": f"models:/{MODEL}@production",
        "input": str(images),
        "output": str(out),
        "master": "local[2]",
        "colorize": "true",
        "cityscapes": "true",
        "env_manager": "local",
        "batch_size": "3",
    }
    cmd = ["mlflow", "run", ".", "-e", "batch_predict", "--env-manager", "local"]
    cmd += [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    table = pd.read_parquet(out / TABLE_FILE)
    inputs = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))
    assert table["path"].tolist() == [str(p) for p in inputs]  # the text file is not an input
    broken = table.set_index("path").loc[str(images / "city_a" / "broken.png")]
    assert "corrupt or truncated" in broken["error"] and pd.isna(broken["mask_path"]) and pd.isna(broken["height"])
    scored = table[table["error"].isna()]
    assert len(scored) == NUM_IMAGES - 1
    expected = in_process(store, [Path(p) for p in scored["path"]])
    pixel_columns = [PIXELS_PREFIX + name for name in CLASSES.names]  # "pixels_traffic light" included
    for row, want in zip(scored.to_dict("records"), expected.to_dict("records"), strict=True):
        mask = png(out / row["mask_path"])
        np.testing.assert_array_equal(mask, png(want["mask"]), err_msg=row["path"])
        np.testing.assert_array_equal(png(out / row["color_path"]), png(want["colorized"]), err_msg=row["path"])
        # The benchmark's results: Cityscapes label ids (road 7, sky 23, car 26, traffic light 19), named as the input.
        assert row["label_ids_path"] == "cityscapes/" + row["mask_path"].removeprefix("mask/")
        np.testing.assert_array_equal(png(out / row["label_ids_path"]), LABEL_IDS[mask], err_msg=row["path"])
        assert (row["height"], row["width"]) == mask.shape == (want["height"], want["width"])
        counts = np.bincount(mask.ravel(), minlength=CLASSES.num_classes)
        assert [row[c] for c in pixel_columns] == counts.tolist(), row["path"]
    assert (out / "mask" / "city_a" / "frame_00.png").is_file()  # names mirror the input tree, .jpg -> .png

    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`mlflow.project.entryPoint` = 'batch_predict'")
    assert run.info.status == "FINISHED" and run.data.params["batch_size"] == "3"
    assert run.data.metrics["batch/images"] == NUM_IMAGES and run.data.metrics["batch/failed"] == 1
    assert run.data.tags["model_name"] == MODEL and run.data.tags["model_version"] == "1"


def test_glob_selects_files_and_skips_outputs_inside_the_input(java, store, images, tmp_path):
    """``DIR/**/*.jpg`` reads the JPEGs of every folder; a re-run writing inside the input does not read its masks."""
    source = tmp_path / "in"
    shutil.copytree(images, source)
    out = source / "predictions"  # inside the input folder, already holding a mask from an earlier run
    (out / "mask").mkdir(parents=True)
    cv2.imwrite(str(out / "mask" / "old.jpg"), np.zeros((8, 8), np.uint8))
    with tracking_store(store):
        report = batch_predict_step(f"models:/{MODEL}@production", f"{source}/**/*.jpg", out, master="local[1]")
    table = pd.read_parquet(report.table)
    assert table["path"].tolist() == [str(p) for p in sorted(source.rglob("city_*/*.jpg"))]
    assert report.failed == 0 and report.images == len(table) == 5
    assert "color_path" not in table.columns and not (out / "color").exists()
    for row in table.itertuples(index=False):
        assert png(out / row.mask_path).shape == (row.height, row.width)
