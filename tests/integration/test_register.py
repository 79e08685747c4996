"""Released FC-HarDNet weights become a registered version that evaluate, promote and export use unchanged."""

from __future__ import annotations

import hashlib
import subprocess
import uuid

import mlflow
import torch
from conftest import MLFLOW, child_env
from mlflow import MlflowClient

from entrypoints.register import main as register_main
from segmentation.mlops.model_store import load_model
from segmentation.models import FCHarDNet
from segmentation.steps.evaluate import Protocol, evaluate_step
from segmentation.steps.export import export_step


def released_checkpoint(path, num_classes: int = 19, drop: str | None = None, extra: str | None = None):
    """A file in the released format: ``{"model_state": <DataParallel state_dict, keys prefixed 'module.'>}``."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in FCHarDNet(num_classes=num_classes).state_dict().items() if k != drop}
    if extra:
        state[f"module.{extra}"] = torch.zeros(1)
    torch.save({"epoch": 10, "model_state": state}, path)
    return path


def test_released_weights_register_evaluate_promote_and_export(tmp_path, tracking_uri, tiny_data, capsys):
    name = f"released-{uuid.uuid4().hex[:8]}"
    checkpoint = released_checkpoint(tmp_path / "hardnet70_cityscapes_model.pkl")
    assert register_main(["--checkpoint", str(checkpoint), "--registered-model", name]) == 0
    client = MlflowClient(tracking_uri)
    (version,) = client.search_model_versions(f"name = '{name}'")
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert version.tags["source_file"] == "hardnet70_cityscapes_model.pkl"
    assert version.tags["source_sha256"] == sha256 and version.tags["source_format"] == "released"
    assert client.get_registered_model(name).tags["source_sha256"] == sha256
    # The registered weights are exactly the file's.
    assert mlflow.pyfunc.load_model(f"models:/{name}/1").metadata.metadata["backend"] == "pytorch"
    loaded, classes = load_model(f"models:/{name}/1")
    expected = torch.load(checkpoint, weights_only=True)["model_state"]
    assert all(torch.equal(v, expected[f"module.{k}"]) for k, v in loaded.state_dict().items())
    assert classes.num_classes == 19

    result, promotion = evaluate_step(f"models:/{name}/1", Protocol(data=str(tiny_data), num_worst=0), promote=True)
    assert promotion.promoted and client.get_registered_model(name).aliases == {"production": "1"}
    exported = export_step(f"models:/{name}@production", registered_model=f"{name}-onnx", sizes=((64, 128),))
    assert exported["registered_version"] == "1" and exported["aliases"] == {"production": "1"}
    # The image a deployment team builds for the production alias (`docker build` needs a Docker engine).
    docker = subprocess.run(
        [MLFLOW, "models", "generate-dockerfile", "-m", f"models:/{name}@production", "-d", str(tmp_path / "image")],
        env=child_env(tracking_uri),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert docker.returncode == 0, docker.stderr[-3000:]
    dockerfile = (tmp_path / "image" / "Dockerfile").read_text()
    assert "model_dir" in dockerfile and (tmp_path / "image" / "model_dir" / "MLmodel").is_file()
    requirements = (tmp_path / "image" / "model_dir" / "requirements.txt").read_text()
    assert "torch==" in requirements and "+cpu" not in requirements


def test_mismatched_weights_are_refused_with_the_keys_named(tmp_path, tracking_uri, capsys):
    missing = released_checkpoint(tmp_path / "missing.pkl", drop="finalConv.bias", extra="aux_head.weight")
    assert register_main(["--checkpoint", str(missing), "--registered-model", "never-registered"]) == 2
    err = capsys.readouterr().err
    assert "missing keys: finalConv.bias" in err and "unexpected keys: aux_head.weight" in err
    other_head = released_checkpoint(tmp_path / "eight.pkl", num_classes=8)
    assert register_main(["--checkpoint", str(other_head), "--registered-model", "never-registered"]) == 2
    assert "the checkpoint has 8 classes and the model 19" in capsys.readouterr().err
    assert register_main(["--checkpoint", str(tmp_path / "nope.pkl"), "--registered-model", "x"]) == 2
    assert not MlflowClient(tracking_uri).search_registered_models("name = 'never-registered'")
