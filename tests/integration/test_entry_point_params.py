"""Every parameter of every MLproject entry point reaches the library function that reads it.

For each entry point the test builds the command MLflow would run (``compute_command``) with every parameter set to a
value other than its default, runs the entry point's ``main`` with the step function replaced by a recorder, and
checks where each value arrived (a resolved config key, a step argument, a dataclass field). A parameter added to
MLproject without a row in ``VALUES`` fails the test, so a new parameter cannot be parsed and dropped.
"""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from conftest import MLFLOW_RUN_VARS
from mlflow.projects import _project_spec

# (entry point, param) -> (value set with -P, where it must arrive: a function of the recorded call)
VALUES = {
    "main": {
        "dataset": ("cvat", lambda c: c["params"].dataset),
        "raw_dir": ("/raw/export", lambda c: c["params"].raw_dir),
        "data_dir": ("/data/out", lambda c: c["params"].data_dir),
        "config": ("configs/tiny.yaml", lambda c: c["params"].config),
        "lr": ("0.05", lambda c: c["params"].lr),
        "registered_model": ("my-model", lambda c: c["params"].registered_model),
        "num_images": ("20", lambda c: str(c["params"].num_images)),
        "num_processes": ("2", lambda c: str(c["params"].num_processes)),
        "overrides": ("train.max_steps=50", lambda c: c["params"].overrides),
        "reuse": ("false", lambda c: str(c["params"].reuse).lower()),
    },
    "preprocess": {
        "dataset": ("cvat", lambda c: c["args"][0]),
        "raw_dir": ("/raw/export", lambda c: c["args"][1]),
        "out_dir": ("/data/out", lambda c: c["args"][2]),
        "split_id": ("split07", lambda c: c["kwargs"]["split_id"]),
        "val_fraction": ("0.3", lambda c: str(c["kwargs"]["val_fraction"])),
        "seed": ("9", lambda c: str(c["kwargs"]["seed"])),
        "num_images": ("20", lambda c: str(c["kwargs"]["num_images"])),
        "height": ("96", lambda c: str(c["kwargs"]["height"])),
        "width": ("160", lambda c: str(c["kwargs"]["width"])),
    },
    "train": {
        "config": ("configs/tiny.yaml", lambda c: str(c["cfg"].train.num_val_images_logged)),
        "data": ("/data/out", lambda c: c["cfg"].data.root),
        "lr": ("0.05", lambda c: str(c["cfg"].train.lr)),
        "epochs": ("3", lambda c: str(c["cfg"].train.epochs)),
        "batch_size": ("16", lambda c: str(c["cfg"].train.batch_size)),
        "num_processes": ("2", lambda c: str(c["num_processes"])),
        "overrides": ("train.max_steps=50", lambda c: f"train.max_steps={c['cfg'].train.max_steps}"),
        "resume": ("0123abcd", lambda c: c["kwargs"]["resume_run_id"]),
        "registered_model": ("my-model", lambda c: c["kwargs"]["registered_model"]),
    },
    "evaluate": {
        "model_uri": ("models:/m/3", lambda c: c["args"][0]),
        "data": ("tests", lambda c: Path(c["args"][1].data).name),  # a `path` param: it must exist
        "split": ("train", lambda c: c["args"][1].split),
        "split_id": ("split07", lambda c: c["args"][1].split_id),
        "batch_size": ("4", lambda c: str(c["args"][1].batch_size)),
        "tta": ("flip", lambda c: c["args"][1].tta),
        "sliding_window": ("128", lambda c: str(c["args"][1].sliding_window)),
        "num_worst": ("2", lambda c: str(c["args"][1].num_worst)),
        "device": ("cpu", lambda c: c["args"][1].device),
        "backend": ("eager", lambda c: c["args"][1].backend),
        "promote": ("true", lambda c: str(c["kwargs"]["promote"]).lower()),
        "force": ("true", lambda c: str(c["kwargs"]["force"]).lower()),
    },
    "promote": {
        "model_name": ("my-model", lambda c: c["args"][0]),
        "version": ("3", lambda c: c["args"][1]),
        "alias": ("staging", lambda c: c["args"][2]),
        "force": ("true", lambda c: str(c["args"][3]).lower()),
        "rollback": ("true", lambda c: str(c["args"][4]).lower()),
    },
    "predict": {
        "model_uri": ("models:/m/3", lambda c: c["args"][0]),
        "input": ("/images", lambda c: c["args"][1]),
        "out_dir": ("/out", lambda c: c["args"][2]),
        "device": ("cpu", lambda c: c["kwargs"]["device"]),
        "tta": ("flip", lambda c: c["kwargs"]["tta"]),
        "sliding_window": ("128", lambda c: str(c["kwargs"]["sliding_window"])),
        "backend": ("eager", lambda c: c["kwargs"]["backend"]),
    },
    "export": {
        "model_uri": ("models:/m/3", lambda c: c["args"][0]),
        "format": ("onnx,onnx-int8", lambda c: c["args"][1]),
        "opset": ("18", lambda c: str(c["args"][2])),
        "fuse_bn": ("false", lambda c: str(c["args"][3]).lower()),
        "registered_model": ("my-model-onnx", lambda c: c["args"][4]),
        "data": ("/data/out", lambda c: c["kwargs"]["data"]),
        "calibration_images": ("4", lambda c: str(c["kwargs"]["calibration_images"])),
        "max_miou_drop": ("1.5", lambda c: str(c["kwargs"]["max_miou_drop"])),
    },
    "register": {
        "checkpoint": ("tests", lambda c: Path(c["args"][0]).name),  # a `path` param: it must exist
        "registered_model": ("my-model", lambda c: c["args"][1]),
        "classes": ("/data/classes.csv", lambda c: c["args"][2]),
        "arch": ("fchardnet70x", lambda c: c["args"][3]),
    },
}
STEP_FUNCTIONS = {
    "main": "pipeline_step",
    "preprocess": "preprocess_step",
    "evaluate": "evaluate_step",
    "promote": "promote_step",
    "predict": "predict_step",
    "export": "export_step",
    "register": "register_step",
}
EXPECTED_OVERRIDES = {("train", "config"): "1"}  # tiny.yaml's num_val_images_logged (the schema's is 2)


def _argv(repo, entry, values, tmp_path):
    command = entry.compute_command(values, storage_dir=str(tmp_path))
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", f"entrypoints.{entry.name}"]
    return words[3:]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_every_parameter_reaches_the_library(repo, name, monkeypatch, tmp_path):
    monkeypatch.chdir(repo)
    entry = _project_spec.load_project(str(repo)).get_entry_point(name)
    missing = sorted(set(entry.parameters) - set(VALUES[name]))
    assert not missing, f"MLproject {name} has parameters this test does not check: {missing}"
    values = {param: value for param, (value, _) in VALUES[name].items()}
    for param, value in values.items():
        default = entry.parameters[param].default
        assert str(value) != str(default), f"{name}.{param}: pick a non-default test value"
    module = importlib.import_module(f"entrypoints.{name}")
    call: dict = {}
    if name == "train":

        def fake_launch(num_processes, cfg, argv):
            call.update(num_processes=num_processes, cfg=cfg)
            return None

        monkeypatch.setattr(module, "launch_train_step", fake_launch)
        monkeypatch.setattr(module, "train_step", lambda cfg, **kw: call.update(kwargs=kw))
    else:

        def record(*args, **kwargs):
            call.update(args=args, kwargs=kwargs, params=args[0] if args else None)
            outcome = SimpleNamespace(
                outputs={"mask": []},
                out_dir="",
                skipped=[],
                promoted=False,
                version="3",
                alias="",
                reason="",
                companions={},
            )
            return (outcome, None) if name == "evaluate" else outcome

        monkeypatch.setattr(module, STEP_FUNCTIONS[name], record)
        if name == "evaluate":
            monkeypatch.setattr(module, "format_summary", lambda result: "")
        if name in ("main", "export", "register"):
            monkeypatch.setattr(module.json, "dumps", lambda *a, **kw: "")
    assert module.main(_argv(repo, entry, values, tmp_path)) == 0
    for param, (value, where) in VALUES[name].items():
        expected = EXPECTED_OVERRIDES.get((name, param), str(value))
        assert where(call) == expected, f"{name}: -P {param}={value} arrived as {where(call)!r}"


def test_pipeline_forwards_its_parameters_to_the_steps(tmp_path, monkeypatch):
    """The ``main`` step hands lr, overrides, num_images, config... to the child runs it starts."""
    from segmentation.steps import main as steps_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in MLFLOW_RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    started: list[tuple[str, dict]] = []

    def run_step(entry_point, parameters, reuse=True, differs=None):
        started.append((entry_point, dict(parameters)))
        run = SimpleNamespace(
            info=SimpleNamespace(run_id=f"run-{entry_point}"), data=SimpleNamespace(metrics={"eval/mIoU": 0.5})
        )
        return run, False

    monkeypatch.setattr(steps_main, "run_step", run_step)
    monkeypatch.setattr(steps_main, "registered_version_of", lambda client, name, run_id: "7")
    params = steps_main.PipelineParams(
        dataset="synthetic",
        data_dir=str(tmp_path / "d"),
        config="configs/tiny.yaml",
        lr="0.05",
        registered_model="m",
        num_images=20,
        num_processes=2,
        overrides="train.max_steps=50",
        reuse=False,
    )
    steps_main.pipeline_step(params)
    by_step = dict(started)
    assert by_step["preprocess"]["num_images"] == 20 and by_step["preprocess"]["dataset"] == "synthetic"
    assert {k: by_step["train"][k] for k in ("config", "lr", "overrides", "num_processes", "registered_model")} == {
        "config": "configs/tiny.yaml",
        "lr": "0.05",
        "overrides": "train.max_steps=50",
        "num_processes": 2,
        "registered_model": "m",
    }
    assert by_step["evaluate"]["model_uri"] == by_step["export"]["model_uri"] == "models:/m/7"
    assert by_step["promote"] == {"model_name": "m", "version": "7"}
