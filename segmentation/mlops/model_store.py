"""Models in MLflow: log a model package as the serving pyfunc, and load a network back from any model reference.

Every logged model is the same models-from-code pyfunc (:mod:`segmentation.mlops.serving_model` +
:class:`segmentation.mlops.serving.SegmentationModel`): the package (:mod:`segmentation.models.package`) goes in as
an artifact and the ``segmentation`` modules that serving imports as ``code_paths``, so nothing is pickled.
"""

from __future__ import annotations

import ast
import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from torch import nn

from segmentation.data.classes import ClassInfo
from segmentation.inference.onnx import EXECUTION_PROVIDERS
from segmentation.mlops.serving_requests import IMAGE_COLUMN, encode_image
from segmentation.models.package import (
    PREPROCESSING,
    URI_FORMS,
    load_local_model,
    read_package_meta,
    save_model_package,
    save_onnx_package,
)

PACKAGE_ARTIFACT = "package"
SERVING_MODEL_FILE = Path(__file__).with_name("serving_model.py")
# The segmentation package; what serving imports from it goes with each model (served_code_files).
CODE_DIR = Path(__file__).resolve().parent.parent
# Exactly the distributions the served code imports (segmentation itself travels as code_paths; the PyTorch model
# runs on onnxruntime too when its parity probe passes). tests/unit/test_model_requirements.py keeps this true.
CLASS_NAMES_TAG = "segmentation.classes"  # on every LoggedModel: its class names, as JSON
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "opencv-python-headless",
    "onnxruntime",
    "onnx",  # the session appends the class-id ArgMax to the graph (segmentation.inference.onnx.add_class_ids)
    "pyyaml",
    "safetensors",
)


def _module_file(name: str) -> Path | None:
    """The file of module ``segmentation.x.y`` (a package's ``__init__.py``); None for other names."""
    parts = name.split(".")
    if parts[0] != CODE_DIR.name:
        return None
    base = CODE_DIR.parent.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def served_code_files() -> list[Path]:
    """The ``segmentation`` files the served pyfunc can import, relative to the package's parent folder.

    Every ``segmentation`` import of :data:`SERVING_MODEL_FILE` and of what it imports, followed to the end,
    function-level imports included, with the ``__init__.py`` of every package on the way: the code a logged model
    carries (training, sweeps and the steps stay out).
    """
    todo, found = [SERVING_MODEL_FILE.resolve()], set()
    while todo:
        file = todo.pop()
        if file in found:
            continue
        found.add(file)
        folder = file.parent
        while folder != CODE_DIR.parent:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            if (folder / "__init__.py").is_file():
                todo.append(folder / "__init__.py")
            folder = folder.parent
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            todo += [path for path in map(_module_file, names) if path is not None]
    return sorted(path.relative_to(CODE_DIR.parent) for path in found)


def copy_served_code(destination: Path) -> Path:
    """Copy :func:`served_code_files` into ``destination`` (keeping the package layout); returns the package."""
    for relative in served_code_files():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CODE_DIR.parent / relative, target)
    return destination / CODE_DIR.name


def pip_requirements() -> list[str]:
    """Pins of what the served pyfunc imports, at the installed versions without local labels (``+cpu``)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in SERVING_REQUIREMENTS]


def serving_signature() -> ModelSignature:
    outputs = Schema(
        [
            ColSpec(DataType.string, "mask"),
            ColSpec(DataType.long, "height"),
            ColSpec(DataType.long, "width"),
            ColSpec(DataType.string, "colorized", required=False),
        ]
    )
    return ModelSignature(
        # Not "required" for MLflow: a request without it reaches our pyfunc, whose one-line error does not quote the
        # request back (MLflow's own schema error does).
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN, required=False)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("colorize", DataType.boolean, False)]),
    )


def example_request() -> pd.DataFrame:
    """A one-row request holding a 64 x 96 PNG (a few hundred bytes): the logged input example."""
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:32] = (180, 130, 70)  # sky over road, in their Cityscapes colours (BGR order)
    image[32:] = (128, 64, 128)
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})


def log_model_package(
    package: str | Path,
    name: str = "model",
    registered_model_name: str | None = None,
    step: int | None = None,
    fmt: str | None = None,
    run_id: str | None = None,
) -> ModelInfo:
    """Log a model package folder to a run as the serving pyfunc; optionally register a version.

    Args:
        package: a folder written by :func:`~segmentation.models.package.save_model_package` or
            :func:`~segmentation.models.package.save_onnx_package`.
        name: the logged model's name.
        registered_model_name: register a new version of this model when set.
        step: training step whose metrics the LoggedModel should carry.
        fmt: the numeric format (``onnx``, ``onnx-int8``, ``onnx-fp16``), recorded as metadata ``format`` and as
            the LoggedModel's tag ``format``.
        run_id: log to this run without making it the active run (the active run when ``None``). Entering a run
            with ``mlflow.start_run`` would end it on exit, marking a training that is still going FINISHED.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``...).
    """
    meta = read_package_meta(package)
    backend = meta.get("backend", "pytorch")
    extra = {"onnx_execution_providers": meta["onnx_execution_providers"]} if backend == "onnx" else {}
    format_tag = {"format": fmt} if fmt else {}
    tags = {
        CLASS_NAMES_TAG: json.dumps(meta["classes"]["names"]),
        "num_classes": str(meta["num_classes"]),
        **format_tag,
    }
    model_id = _model_of_run(run_id, name, tags) if run_id else None
    with tempfile.TemporaryDirectory() as tmp:
        code = copy_served_code(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_MODEL_FILE),
            artifacts={PACKAGE_ARTIFACT: str(package)},
            code_paths=[str(code)],
            signature=serving_signature(),
            input_example=example_request(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name or None,
            step=step or 0,
            metadata={"backend": backend, "preprocessing": PREPROCESSING, **extra, **format_tag},
            tags=tags,
            model_id=model_id,
        )
    if run_id:  # what log_model does for the active run: the model is an output of the run at its step
        mlflow.MlflowClient().log_outputs(run_id, [LoggedModelOutput(info.model_id, step or 0)])
    return info


def _model_of_run(run_id: str, name: str, tags: dict[str, str]) -> str:
    """A new (PENDING) LoggedModel of ``run_id`` carrying the run's params, as log_model makes for an active run."""
    run = mlflow.MlflowClient().get_run(run_id)
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=tags, params=run.data.params, experiment_id=run.info.experiment_id
    )
    return model.model_id


def log_pytorch_model(
    model: nn.Module,
    classes: ClassInfo,
    model_cfg: Any,
    name: str = "model",
    registered_model_name: str | None = None,
    step: int | None = None,
) -> ModelInfo:
    """Log an in-memory network (unfused) as the serving pyfunc; see :func:`log_model_package`."""
    with tempfile.TemporaryDirectory() as tmp:
        package = save_model_package(model, classes, model_cfg, Path(tmp) / PACKAGE_ARTIFACT)
        return log_model_package(package, name, registered_model_name, step)


def log_onnx_model(
    onnx_path: str | Path,
    classes: ClassInfo,
    model_cfg: Any,
    name: str = "onnx_model",
    registered_model_name: str | None = None,
    step: int | None = None,
    fmt: str = "onnx",
) -> ModelInfo:
    """Log an exported ONNX file (fp32, INT8 or FP16: all run on onnxruntime, CPUExecutionProvider) as the serving
    pyfunc; ``fmt`` is recorded as the model's ``format``."""
    with tempfile.TemporaryDirectory() as tmp:
        package = save_onnx_package(onnx_path, classes, model_cfg, Path(tmp) / PACKAGE_ARTIFACT, EXECUTION_PROVIDERS)
        return log_model_package(package, name, registered_model_name, step, fmt)


def load_model_with_meta(model_uri: str) -> tuple[nn.Module, ClassInfo, dict]:
    """Like :func:`load_model`, also returning the package metadata (``model.json`` contents)."""
    if model_uri.startswith(("runs:/", "models:/")) or "://" in model_uri:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            except Exception as exc:  # MlflowException, OSError...: say what was asked for and what is accepted
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(
                    f"could not download model '{model_uri}': {first}. Accepted: {', '.join(URI_FORMS)}"
                ) from None
            return load_local_model(local, model_uri)
    if not Path(model_uri).exists():
        raise FileNotFoundError(
            f"model '{model_uri}': no such file or folder, and not an MLflow URI. Accepted: {', '.join(URI_FORMS)}"
        )
    return load_local_model(model_uri)


def load_model(model_uri: str) -> tuple[nn.Module, ClassInfo]:
    """Load a segmentation network in eval mode, with its classes, from any of the places it is kept.

    Args:
        model_uri: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``, a local
            model package folder or MLflow model folder, or a training checkpoint folder.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: the URI cannot be downloaded or holds no PyTorch segmentation model; the message lists what
            was tried and the accepted forms.
    """
    model, classes, _ = load_model_with_meta(model_uri)
    return model, classes
