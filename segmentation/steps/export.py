"""The ``export`` step: ONNX export with BN fused, parity check against PyTorch, the ONNX serving model registered."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import mlflow

from segmentation.inference.onnx import export_onnx
from segmentation.inference.parity import EXPORT_VERIFY_SIZES, ParityError, verify_onnx
from segmentation.mlops import registry
from segmentation.mlops.model_store import load_model_with_meta, log_onnx_model
from segmentation.models.package import ONNX_FILE

FORMATS = ("onnx",)


def export_step(
    model_uri: str,
    fmt: str = "onnx",
    opset: int = 17,
    fuse_bn: bool = True,
    registered_model: str = "",
    sizes: Sequence[tuple[int, int]] = EXPORT_VERIFY_SIZES,
) -> dict:
    """ONNX file, parity metrics and the onnxruntime serving model, in the active (or a new) run.

    When ``model_uri`` names a registered version and ``registered_model`` is set, the ONNX version is linked to it
    (:func:`segmentation.mlops.registry.link_companion`): it takes the aliases its source holds now, and follows it
    whenever promotion or rollback moves ``production``/``previous`` on the source model.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "max_abs_logit", "model_uri", "registered_version", "aliases"}``.

    Raises:
        ValueError: unknown ``fmt`` or a ``model_uri`` that is not a segmentation model.
        ParityError: onnxruntime disagrees with PyTorch (the metrics are logged before raising).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is not supported; available: {list(FORMATS)}")
    model, classes, meta = load_model_with_meta(model_uri)
    model_cfg = SimpleNamespace(arch=meta["arch"], num_classes=int(meta["num_classes"]))
    source = registry.describe_model_uri(model_uri)
    aliases: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        onnx_path = Path(tmp) / ONNX_FILE
        export_onnx(model, onnx_path, opset=opset, fuse_bn=fuse_bn)
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
                aliases = registry.link_companion(
                    registered_model, info.registered_model_version, source.name, source.version
                )
    return {
        **parity,
        "model_uri": info.model_uri,
        "registered_version": info.registered_model_version,
        "aliases": aliases,
    }
