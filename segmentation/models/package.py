"""The model package: the one folder format that training writes, export reads and every served model carries.

A package holds ``model.json`` (arch, num_classes, classes, preprocessing id, backend) and either ``weights.pt`` (a
PyTorch state_dict, loaded with ``weights_only=True``) or ``model.onnx``. :func:`load_local_model` also reads an
MLflow model folder whose artifacts hold a package, and a training checkpoint folder (``model.safetensors``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from segmentation.data.classes import ClassInfo
from segmentation.io import atomic_path, write_text_atomic
from segmentation.models.factory import build_model

META_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
PREPROCESSING = "bgr_imagenet_v1"  # segmentation.models.preprocessing: BGR uint8, ImageNet mean/std in BGR order
CHECKPOINT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
URI_FORMS = (
    "runs:/<run_id>/<path>",
    "models:/<name>/<version>",
    "models:/<name>@<alias>",
    "a model package folder (model.json + weights.pt)",
    "a training checkpoint folder (model.safetensors)",
)


def package_meta(classes: ClassInfo, model_cfg: Any, backend: str) -> dict:
    """The ``model.json`` contents for a network described by ``model_cfg`` (``arch``, ``num_classes``)."""
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
    meta = package_meta(classes, model_cfg, "pytorch")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2))
    return directory


def save_onnx_package(
    onnx_path: str | Path, classes: ClassInfo, model_cfg: Any, directory: str | Path, providers: Sequence[str]
) -> Path:
    """Write an exported ``.onnx`` file and its ``model.json`` into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, directory / ONNX_FILE)
    meta = {**package_meta(classes, model_cfg, "onnx"), "onnx_execution_providers": list(providers)}
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


def _network(arch: str, num_classes: int) -> nn.Module:
    return build_model(SimpleNamespace(arch=arch, num_classes=num_classes, pretrained=""))


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
    model = _network(meta["arch"], int(meta["num_classes"]))
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval(), ClassInfo.from_dict(meta["classes"])


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
        state = load_file(str(weights), device="cpu")
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    arch = "fchardnet70"
    config = _nearby(directory, ("resolved.yaml", "config/resolved.yaml", "config.yaml"))
    if config is not None:  # the training's resolved config names the architecture
        arch = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("arch", arch)
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
    meta = package_meta(classes, SimpleNamespace(arch=arch, num_classes=num_classes), "pytorch")
    model = _network(arch, num_classes)
    model.load_state_dict(state)
    return model.eval(), classes, meta


def load_local_model(local: str | Path, model_uri: str | None = None) -> tuple[nn.Module, ClassInfo, dict]:
    """Load a PyTorch network in eval mode, with its classes and package metadata, from a local folder.

    Args:
        local: a model package folder, an MLflow model folder with a package in its artifacts, or a training
            checkpoint folder.
        model_uri: what the user asked for, named in the error message (default: ``local``).

    Raises:
        ValueError: the folder holds no PyTorch segmentation model; the message lists what was tried.
    """
    local = Path(local)
    model_uri = model_uri or str(local)
    tried = []
    if local.is_dir():
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
