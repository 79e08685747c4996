"""Logged models load from every MLflow URI, and the export step registers its ONNX model (a private sqlite store)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_bn_model, sqlite_tracking_store
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.mlops.model_store import load_model, log_pytorch_model
from segmentation.mlops.serving_requests import decode_image, encode_image
from segmentation.models import FCHarDNet
from segmentation.steps.export import export_step

CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))
CFG = ModelConfig(num_classes=3)
SIZES = ((64, 128), (96, 160), (70, 90))


def _same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.fixture(scope="module")
def model() -> FCHarDNet:
    return random_bn_model(num_classes=3)


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    """A private sqlite store (registry included) for this test; no server needed."""
    with sqlite_tracking_store(tmp_path) as uri:
        yield uri


def test_logged_model_loads_from_every_mlflow_uri_and_predicts(model, sqlite_tracking):
    name = "unit-export-model"
    with mlflow.start_run() as run:
        info = log_pytorch_model(model, CLASSES, CFG, name="model", registered_model_name=name)
    client = MlflowClient()
    client.set_registered_model_alias(name, "production", info.registered_model_version)
    for uri in (f"runs:/{run.info.run_id}/model", f"models:/{name}/1", f"models:/{name}@production", info.model_uri):
        loaded, classes = load_model(uri)
        assert classes == CLASSES
        _same_function(model, loaded)

    local = mlflow.artifacts.download_artifacts(info.model_uri)
    requirements = (Path(local) / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "numpy", "pandas", "opencv-python-headless"}
    assert all("==" in r for r in requirements)
    listing = {p.name for p in Path(local).rglob("*")}
    assert "python_model.pkl" not in listing and "serving_model.py" in listing  # models-from-code, no pickle
    assert {"input_example.json", "serving_input_example.json"} <= listing
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@production")
    assert pyfunc.metadata.get_input_schema().input_names() == ["image"]
    example = json.loads((Path(local) / "input_example.json").read_text())
    out = pyfunc.predict(pd.DataFrame(example["data"], columns=example["columns"]), params={"colorize": True})
    assert list(out.columns) == ["mask", "height", "width", "colorized"] and out["height"][0] == 64


def test_export_step_logs_parity_and_registers_the_onnx_model(model, sqlite_tracking):
    with mlflow.start_run():
        info = log_pytorch_model(model, CLASSES, CFG, registered_model_name="unit-export-src")
    result = export_step("models:/unit-export-src/1", registered_model="unit-export-src-onnx", sizes=SIZES[:2])
    assert result["max_abs_diff"] <= 1e-3 and result["argmax_agreement"] >= 0.999
    assert str(result["registered_version"]) == "1"
    run = MlflowClient().get_run(MlflowClient().get_model_version("unit-export-src-onnx", "1").run_id)
    assert run.data.metrics["export/max_abs_diff"] == pytest.approx(result["max_abs_diff"])
    assert "export/argmax_agreement" in run.data.metrics
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "onnx")] == ["onnx/model.onnx"]

    torch_pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    onnx_pyfunc = mlflow.pyfunc.load_model("models:/unit-export-src-onnx/1")
    assert onnx_pyfunc.metadata.metadata["onnx_execution_providers"] == ["CPUExecutionProvider"]
    image = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    request = pd.DataFrame({"image": [encode_image(image)]})
    torch_mask = decode_image(torch_pyfunc.predict(request)["mask"][0])
    onnx_mask = decode_image(onnx_pyfunc.predict(request)["mask"][0])
    assert torch_mask.shape == (80, 120, 3) and (torch_mask == onnx_mask).mean() >= 0.999


def test_export_entry_point_fails_on_a_uri_that_is_not_a_model(tmp_path, sqlite_tracking, repo, monkeypatch):
    monkeypatch.syspath_prepend(str(repo))  # entrypoints/ is not an installed package
    from entrypoints.export import main as export_main

    (tmp_path / "notes.txt").write_text("not a model")
    assert export_main(["--model-uri", str(tmp_path)]) == 2
    assert export_main(["--model-uri", "models:/no-such-model/1"]) == 2


@pytest.mark.parametrize(
    ("fmt", "opset", "message"),
    [("onnx", "99", r"opset must be in 11\.\.20, got 99"), ("onnx-int8", "11", "onnx-int8 needs opset >= 13")],
)
def test_an_opset_the_exporter_or_the_format_cannot_take_is_refused_before_anything_runs(fmt, opset, message, capsys):
    from entrypoints import export as export_cli

    argv = ["--model-uri", "models:/none/1", "--format", fmt, "--opset", opset, "--data", "/nowhere"]
    assert export_cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
