"""The ``register`` step: released FC-HarDNet weights become a registered model version, like a trained one.

The checkpoint is loaded strictly (every key and shape must match the network built for the class table), logged
as the same model package and pyfunc that training logs, and registered with its provenance (file name, sha256,
format), so that ``evaluate -P promote=true``, ``export`` and ``mlflow models serve`` use it unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import mlflow

from segmentation.data.classes import ClassInfo
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.mlops.registry import document_model
from segmentation.mlops.runs import attached_run
from segmentation.models import build_model, load_pretrained

BUILT_IN_CLASSES = "cityscapes"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_class_table(classes: str) -> ClassInfo:
    """``cityscapes`` (the 19 train classes) or a ``classes.csv`` as preprocess writes it (``id,name,r,g,b``)."""
    if classes == BUILT_IN_CLASSES:
        return ClassInfo.cityscapes()
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"classes: {classes!r} is neither '{BUILT_IN_CLASSES}' nor an existing classes.csv")
    return ClassInfo.read_csv(path)


def register_step(
    checkpoint: str | Path, registered_model: str, classes: str = BUILT_IN_CLASSES, arch: str = "fchardnet70"
) -> dict[str, str]:
    """Log ``checkpoint`` as a model of a new run and register it as a version of ``registered_model``.

    Args:
        checkpoint: the released ``hardnet70_cityscapes_model.pkl`` (``model_state`` with ``module.`` prefixes) or a
            plain FC-HarDNet state_dict.
        registered_model: registry name (a new version is created).
        classes: the class table the weights were trained with: ``cityscapes`` or a ``classes.csv`` path.
        arch: the architecture (``model.arch``).

    Returns:
        ``{"model_uri", "version", "run_id", "sha256"}``.

    Raises:
        FileNotFoundError: the checkpoint or the class table does not exist.
        ValueError: no model name, an unreadable file, a backbone-only file, or keys/shapes that do not match (the
            message lists the missing and unexpected keys and the class counts).
    """
    if not registered_model:
        raise ValueError("registered_model is empty: name the registered model the weights become a version of")
    path = Path(checkpoint)
    table = load_class_table(classes)
    model_cfg = SimpleNamespace(arch=arch, num_classes=table.num_classes, pretrained="")
    model = build_model(model_cfg)
    report = load_pretrained(model, path)  # raises naming missing/unexpected keys and shape mismatches
    if report.source == "backbone" or report.kept:
        raise ValueError(
            f"{path} cannot be served as it is: {report.message}. Registering needs the whole network, with a head "
            f"for the {table.num_classes} classes of {classes!r}"
        )
    provenance = {"source_file": path.name, "source_sha256": _sha256(path), "source_format": report.source}
    with attached_run(run_name="register") as run_id:
        mlflow.set_tags(provenance)
        info = log_pytorch_model(model.eval(), table, model_cfg, registered_model_name=registered_model)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key, value in provenance.items():
            client.set_model_version_tag(registered_model, version, key, value)
        document_model(
            registered_model,
            list(table.names),
            {"task": "semantic-segmentation", "num_classes": table.num_classes, **provenance},
        )
    return {
        "model_uri": f"models:/{registered_model}/{version}",
        "version": version,
        "run_id": run_id,
        "sha256": provenance["source_sha256"],
    }
