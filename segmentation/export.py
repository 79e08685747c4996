"""Model packages, MLflow models that serve them, loading any model reference, and ONNX export with parity checks.

A *model package* is a folder with ``model.json`` (arch, num_classes, classes, preprocessing id, backend) and
either ``weights.pt`` (a PyTorch state_dict) or ``model.onnx``. Both kinds are logged as the same
models-from-code pyfunc (``segmentation/serving_model.py`` + :class:`segmentation.serving.SegmentationModel`):
the package goes in as an artifact and the ``segmentation`` code as ``code_paths``, so nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from torch import nn

from segmentation import registry
from segmentation.data.classes import ClassInfo
from segmentation.inference import ParityError, check_parity
from segmentation.io import atomic_path, write_text_atomic
from segmentation.models import build_model
from segmentation.models import fuse_bn as fold_batchnorm

META_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
PREPROCESSING = "bgr_imagenet_v1"  # segmentation.models.preprocessing: BGR uint8, ImageNet mean/std in BGR order
PACKAGE_ARTIFACT = "package"
SERVING_MODEL_FILE = Path(__file__).with_name("serving_model.py")
CODE_DIR = Path(__file__).resolve().parent
# Distributions the pyfunc imports when served (segmentation itself travels as code_paths); the PyTorch model
# runs on onnxruntime too when its parity probe passes (segmentation.inference.Predictor).
SERVING_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "opencv-python-headless", "onnxruntime")
ONNX_PROVIDERS = ["CPUExecutionProvider"]
DEFAULT_VERIFY_SIZES = ((64, 128), (96, 160), (200, 328))


def _meta(classes: ClassInfo, model_cfg: Any, backend: str) -> dict:
    if classes.num_classes != model_cfg.num_classes:
        raise ValueError(f"classes has {classes.num_classes} names but model.num_classes is {model_cfg.num_classes}")
    return {
        "format_version": 1,
        "arch": model_cfg.arch,
        "num_classes": model_cfg.num_classes,
        "classes": classes.to_dict(),
        "preprocessing": PREPROCESSING,
        "backend": backend,
    }


def save_model_package(model: nn.Module, classes: ClassInfo, model_cfg: Any, directory: str | Path) -> Path:
    """Write ``weights.pt`` (state_dict) and ``model.json`` into ``directory``; returns the directory.

    Args:
        model: the unfused network (its state_dict keys must match ``build_model(model_cfg)``).
        classes: names and colours, stored so that they travel with the model.
        model_cfg: a ``ModelConfig`` (``arch``, ``num_classes``).
        directory: created if missing.
    """
    directory = Path(directory)
    meta = _meta(classes, model_cfg, "pytorch")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2))
    return directory


def read_package_meta(directory: str | Path) -> dict:
    """Read and check ``model.json`` of a package."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a model package: {path} is missing")
    meta = json.loads(path.read_text())
    missing = [k for k in ("arch", "num_classes", "classes") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; found {sorted(meta)}")
    if meta.get("preprocessing", PREPROCESSING) != PREPROCESSING:
        raise ValueError(f"{path}: preprocessing '{meta['preprocessing']}' is not supported; expected {PREPROCESSING}")
    return meta


def load_model_package(directory: str | Path) -> tuple[nn.Module, ClassInfo]:
    """Rebuild the network of a PyTorch package in eval mode, with its classes.

    Raises:
        FileNotFoundError: no ``model.json`` or ``weights.pt`` in ``directory``.
        ValueError: an ONNX package, or weights that do not match the architecture.
    """
    directory = Path(directory)
    meta = read_package_meta(directory)
    if meta.get("backend", "pytorch") != "pytorch":
        raise ValueError(f"{directory} holds a '{meta['backend']}' model; a PyTorch package has {WEIGHTS_FILE}")
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"model package {directory} has no {WEIGHTS_FILE}")
    model = build_model(SimpleNamespace(arch=meta["arch"], num_classes=int(meta["num_classes"]), pretrained=""))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), ClassInfo.from_dict(meta["classes"])


def pip_requirements() -> list[str]:
    """Exact pins (installed versions) of what the served pyfunc imports."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


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
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("colorize", DataType.boolean, False)]),
    )


def example_request() -> pd.DataFrame:
    """A one-row request holding a 64 x 96 PNG (a few hundred bytes): the logged input example."""
    from segmentation.serving import IMAGE_COLUMN, encode_image

    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:32] = (180, 130, 70)  # sky over road, in their Cityscapes colours (BGR order)
    image[32:] = (128, 64, 128)
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})


def _log_package(
    package: Path,
    name: str,
    backend: str,
    registered_model_name: str | None,
    step: int | None,
    extra_metadata: dict | None = None,
) -> ModelInfo:
    with tempfile.TemporaryDirectory() as tmp:
        code = shutil.copytree(CODE_DIR, Path(tmp) / "segmentation", ignore=shutil.ignore_patterns("__pycache__"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVING_MODEL_FILE),
            artifacts={PACKAGE_ARTIFACT: str(package)},
            code_paths=[str(code)],
            signature=serving_signature(),
            input_example=example_request(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name or None,
            step=step or 0,
            metadata={"backend": backend, "preprocessing": PREPROCESSING, **(extra_metadata or {})},
        )


def log_pytorch_model(
    model: nn.Module,
    classes: ClassInfo,
    model_cfg: Any,
    name: str = "model",
    registered_model_name: str | None = None,
    step: int | None = None,
) -> ModelInfo:
    """Log ``model`` to the active run as the serving pyfunc (PyTorch backend); optionally register it.

    Args:
        model: the unfused network.
        classes: class names and colours served with the model.
        model_cfg: ``ModelConfig`` (``arch``, ``num_classes``).
        name: the logged model's name.
        registered_model_name: register a new version of this model when set.
        step: training step whose metrics the LoggedModel should carry.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``...).
    """
    with tempfile.TemporaryDirectory() as tmp:
        package = save_model_package(model, classes, model_cfg, Path(tmp) / PACKAGE_ARTIFACT)
        return _log_package(package, name, "pytorch", registered_model_name, step)


def log_onnx_model(
    onnx_path: str | Path,
    classes: ClassInfo,
    model_cfg: Any,
    name: str = "onnx_model",
    registered_model_name: str | None = None,
    step: int | None = None,
) -> ModelInfo:
    """Log an exported ONNX file as the serving pyfunc (onnxruntime backend, CPUExecutionProvider)."""
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / PACKAGE_ARTIFACT
        package.mkdir()
        shutil.copyfile(onnx_path, package / ONNX_FILE)
        meta = {**_meta(classes, model_cfg, "onnx"), "onnx_execution_providers": ONNX_PROVIDERS}
        write_text_atomic(package / META_FILE, json.dumps(meta, indent=2))
        return _log_package(
            package, name, "onnx", registered_model_name, step, {"onnx_execution_providers": ONNX_PROVIDERS}
        )


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17, fuse_bn: bool = True) -> Path:
    """Export ``model`` to ONNX with dynamic batch, height and width (input ``image``, output ``logits``).

    Args:
        model: the network; it is not modified (BN fusion works on a copy).
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset version.
        fuse_bn: fold BatchNorm into the convolutions first (fewer ops, same function).

    Shape:
        - Input ``image``: ``(N, 3, H, W)`` float32, normalised BGR; H, W >= 64.
        - Output ``logits``: ``(N, num_classes, H, W)``.
    """
    net = fold_batchnorm(model) if fuse_bn else model
    was_training = net.training
    net.eval()
    dims = {0: "batch", 2: "height", 3: "width"}
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # The model's Python input checks become constants in the trace: expected, not worth a warning.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False on purpose: the TorchScript exporter takes ~1 s here and handles dynamic H x W with
            # align_corners resizes without dynamic_shapes; its deprecation notice is expected.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net,
                (torch.randn(1, 3, 96, 160),),
                str(tmp),
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": dims, "logits": dims},
                dynamo=False,
            )
    finally:
        net.train(was_training)
    return Path(path)


class _OnnxFile:
    """An ONNX file run by onnxruntime (CPU) as a logits callable, for :func:`check_parity`."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), providers=ONNX_PROVIDERS)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.cpu().numpy()})[0])

    def __repr__(self) -> str:
        return f"ONNX file {self.path}"


def verify_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    sizes: Sequence[tuple[int, int]] = DEFAULT_VERIFY_SIZES,
    batch_size: int = 2,
    atol: float = 1e-3,
    min_agreement: float = 0.999,
    seed: int | None = None,
    rtol: float = 1e-5,
) -> dict[str, float]:
    """Compare onnxruntime (CPU) with the PyTorch model (eval mode) on fresh random inputs of several sizes.

    The rule is :func:`segmentation.inference.check_parity`'s: max |logit diff| <= ``atol + rtol * max|logit|`` and
    argmax agreement >= ``min_agreement`` at every size.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "max_abs_logit"}`` (worst over ``sizes``).

    Raises:
        ParityError: either tolerance is exceeded or a shape differs; the message gives the numbers per size and the
            seed that reproduces them.
    """
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    return check_parity(_OnnxFile(onnx_path), model, sizes, batch_size, atol, min_agreement, seed, rtol)


CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
URI_FORMS = (
    "runs:/<run_id>/<path>",
    "models:/<name>/<version>",
    "models:/<name>@<alias>",
    "a model package folder (model.json + weights.pt)",
    "a training checkpoint folder (model.safetensors)",
)


def _nearby(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` in ``directory`` or its two parents (a checkpoint sits in ``<output>/checkpoints/``)."""
    for folder in (directory, directory.parent, directory.parent.parent):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _load_checkpoint(directory: Path) -> tuple[nn.Module, ClassInfo, dict]:
    weights = next(directory / n for n in CHECKPOINT_WEIGHTS if (directory / n).is_file())
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights), device="cpu")
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    config, arch = _nearby(directory, ("resolved.yaml", "config/resolved.yaml", "config.yaml")), "fchardnet70"
    if config is not None:
        from segmentation.config import load_config

        arch = load_config(config).model.arch
    if "finalConv.weight" not in state:
        raise ValueError(f"{weights}: no 'finalConv.weight' among its {len(state)} tensors; not an FC-HarDNet")
    num_classes = int(state["finalConv.weight"].shape[0])
    classes_csv = _nearby(directory, ("classes.csv", "split/classes.csv"))
    if classes_csv is not None:
        classes = ClassInfo.read_csv(classes_csv)
    elif num_classes == 19:
        classes = ClassInfo.cityscapes()
    else:
        classes = ClassInfo(
            tuple(f"class_{i}" for i in range(num_classes)),
            tuple((37 * i % 256, 91 * i % 256, 151 * i % 256) for i in range(num_classes)),
        )
    meta = _meta(classes, SimpleNamespace(arch=arch, num_classes=num_classes), "pytorch")
    model = build_model(SimpleNamespace(arch=arch, num_classes=num_classes, pretrained=""))
    model.load_state_dict(state)
    return model.eval(), classes, meta


def _load_local(local: Path, model_uri: str) -> tuple[nn.Module, ClassInfo, dict]:
    tried = []
    if local.is_dir():
        # A package folder, or an MLflow model folder (MLmodel) whose pyfunc artifacts hold the package.
        metas = [local / META_FILE] if (local / META_FILE).is_file() else []
        if not metas and (local / "MLmodel").is_file():
            metas = sorted(local.glob(f"artifacts/*/{META_FILE}"))
        for meta_path in metas:
            meta = read_package_meta(meta_path.parent)
            if meta.get("backend", "pytorch") != "pytorch":
                tried.append(f"{meta_path.parent}: a '{meta['backend']}' package, not PyTorch weights")
                continue
            model, classes = load_model_package(meta_path.parent)
            return model, classes, meta
        if not metas:
            tried.append(f"{local}: no {META_FILE} (model package) and no MLmodel with a package inside")
        if any((local / n).is_file() for n in CHECKPOINT_WEIGHTS):
            return _load_checkpoint(local)
        tried.append(f"{local}: no training checkpoint weights ({' or '.join(CHECKPOINT_WEIGHTS)})")
    else:
        tried.append(f"{local}: not a folder")
    raise ValueError(
        f"'{model_uri}' is not a segmentation model. Tried: {'; '.join(tried)}. Accepted: {', '.join(URI_FORMS)}"
    )


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
            return _load_local(Path(local), model_uri)
    path = Path(model_uri)
    if not path.exists():
        raise FileNotFoundError(
            f"model '{model_uri}': no such file or folder, and not an MLflow URI. Accepted: {', '.join(URI_FORMS)}"
        )
    return _load_local(path, model_uri)


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


def run_export(
    model_uri: str,
    fmt: str = "onnx",
    opset: int = 17,
    fuse_bn: bool = True,
    registered_model: str = "",
    sizes: Sequence[tuple[int, int]] = DEFAULT_VERIFY_SIZES,
) -> dict:
    """The ``export`` step: ONNX file, parity metrics and the onnxruntime serving model, in the active run.

    When ``model_uri`` names a registered version and ``registered_model`` is set, the ONNX version is linked to it
    (:func:`segmentation.registry.link_companion`): it takes the aliases its source holds now, and follows it
    whenever promotion or rollback moves ``production``/``previous`` on the source model.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "model_uri", "registered_version", "aliases"}``.

    Raises:
        ValueError: unknown ``fmt`` or a ``model_uri`` that is not a segmentation model.
        ParityError: onnxruntime disagrees with PyTorch (the metrics are logged before raising).
    """
    if fmt != "onnx":
        raise ValueError(f"format '{fmt}' is not supported; available: ['onnx']")
    model, classes, meta = load_model_with_meta(model_uri)
    model_cfg = SimpleNamespace(arch=meta["arch"], num_classes=int(meta["num_classes"]))
    source = registry.describe_model_uri(model_uri)
    aliases: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        onnx_path = export_onnx(model, Path(tmp) / ONNX_FILE, opset=opset, fuse_bn=fuse_bn)
        try:
            parity = verify_onnx(model, onnx_path, sizes)
        except ParityError as exc:  # keep the numbers on the failed run, then fail the step
            mlflow.log_metrics({f"export/{k}": v for k, v in exc.result.items()})
            raise
        mlflow.log_metrics({f"export/{k}": v for k, v in parity.items()})
        mlflow.log_artifact(str(onnx_path), "onnx")
        info = log_onnx_model(
            onnx_path, classes, model_cfg, name="onnx_model", registered_model_name=registered_model or None
        )
        if source.name and source.version:
            mlflow.set_tags({registry.SOURCE_NAME_TAG: source.name, registry.SOURCE_VERSION_TAG: source.version})
            if registered_model:
                aliases = registry.link_companion(registered_model, info.registered_model_version, source.name,
                                                  source.version)
    return {**parity, "model_uri": info.model_uri, "registered_version": info.registered_model_version,
            "aliases": aliases}
