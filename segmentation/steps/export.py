"""The ``export`` step: ONNX export with BN fused, parity check against PyTorch, then per format (fp32 ONNX, INT8,
FP16) an accuracy and speed comparison with PyTorch fp32, and every format that passes the gate registered as its
own serving model."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from segmentation.data.classes import ClassInfo
from segmentation.data.datasets import SegmentationDataset, load_split
from segmentation.evaluation.evaluate import check_classes
from segmentation.evaluation.formats import (
    CPU_ONLY_NOTE,
    TIMING_SIZES,
    EvalImage,
    file_size,
    format_row,
    gate,
    markdown_table,
)
from segmentation.evaluation.formats import reference_row as pytorch_row
from segmentation.inference.onnx import export_onnx
from segmentation.inference.parity import EXPORT_VERIFY_SIZES, ParityError, verify_onnx
from segmentation.inference.predictor import Predictor
from segmentation.inference.quantize import convert_fp16, default_int8_exclusions, quantize_int8
from segmentation.mlops import companions, registry
from segmentation.mlops.model_store import load_model_with_meta, log_onnx_model
from segmentation.models.package import ONNX_FILE

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8", "onnx-fp16")
SUFFIXES = {"onnx": "", "onnx-int8": "-int8", "onnx-fp16": "-fp16"}  # registered as <registered_model><suffix>
TABLE_FILE = "export/formats.json"


class FormatRefused(ValueError):
    """Formats that lost more mIoU than allowed; ``result`` holds what was exported and registered."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


def parse_formats(value: str | Sequence[str]) -> list[str]:
    """``"onnx,onnx-int8"`` -> ``["onnx", "onnx-int8"]``; ``ValueError`` names an unknown or empty format."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names or "" in names:
        raise ValueError(
            f"format={value!r}: unknown format {unknown or ['']}; allowed: a comma-separated list of "
            f"{', '.join(FORMATS)}"
        )
    return list(dict.fromkeys(names))


OPSETS = range(11, 21)  # 11: what the tests cover down to; 20: torch's TorchScript exporter's newest
MIN_INT8_OPSET = 13  # per-channel DequantizeLinear (its axis attribute)


def _check(formats: list[str], data: str, calibration_images: int, max_miou_drop: float, opset: int) -> None:
    if opset not in OPSETS:
        raise ValueError(f"opset must be in {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    if "onnx-int8" in formats and opset < MIN_INT8_OPSET:
        raise ValueError(f"format onnx-int8 needs opset >= {MIN_INT8_OPSET} (per-channel weight scales), got {opset}")
    needs_data = [f for f in formats if f != "onnx"]
    if needs_data and not data:
        raise ValueError(
            f"format {needs_data[0]} needs data=<the preprocess out_dir>: its calibration images (train split) and "
            "the accuracy gate's evaluation split come from there"
        )
    if calibration_images < 1:
        raise ValueError(f"calibration_images must be >= 1, got {calibration_images}")
    if not max_miou_drop >= 0:
        raise ValueError(f"max_miou_drop must be >= 0 (mIoU points), got {max_miou_drop}")


def load_images(data: str, split_id: str, split: str, classes: ClassInfo, limit: int = 0) -> list[EvalImage]:
    """The raw images and masks of one split (the first ``limit`` rows when ``limit`` > 0), classes checked."""
    table, data_classes, root = load_split(data, split_id)
    check_classes(classes, data_classes)
    dataset = SegmentationDataset(table, split, None, root, classes.num_classes, classes.ignore_index)
    count = min(limit, len(dataset)) if limit > 0 else len(dataset)
    return [EvalImage(*dataset.read_raw(i)) for i in range(count)]


def _build(fmt: str, fp32: Path, folder: Path, calibration: list | None, exclude: Sequence[str] | None) -> Path:
    if fmt == "onnx":
        return fp32
    path = folder / fmt / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx-int8":
        exclude = default_int8_exclusions(fp32) if exclude is None else exclude
        logger.info("INT8: calibrating on %d images; kept in fp32: %s", len(calibration), list(exclude) or "none")
        return quantize_int8(fp32, [c.image for c in calibration], path, exclude)
    return convert_fp16(fp32, path)


def _key(column: str) -> str:
    """A table column as an MLflow metric or tag key: ``mIoU delta (points)`` -> ``mIoU_delta_points``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", column).strip("_")


def _numbers(row: dict) -> dict[str, float]:
    return {_key(k): v for k, v in row.items() if isinstance(v, float)}


def _tags(row: dict) -> dict[str, str]:
    return {"format": row["format"], **{f"export/{k}": f"{v:.6g}" for k, v in _numbers(row).items()}}


def _description(table: list[dict], fmt: str, model_uri: str) -> str:
    return (
        f"`{fmt}` export of `{model_uri}`. Accuracy on the evaluation split and latency (median ms per image on "
        f"the machine that ran the export) of every format it measured:\n\n{markdown_table(table, highlight=fmt)}"
    )


def export_step(
    model_uri: str,
    fmt: str | Sequence[str] = "onnx",
    opset: int = 17,
    fuse_bn: bool = True,
    registered_model: str = "",
    sizes: Sequence[tuple[int, int]] = EXPORT_VERIFY_SIZES,
    data: str = "",
    calibration_images: int = 8,
    max_miou_drop: float = 0.5,
    split_id: str = "split01",
    eval_split: str = "val",
    timing_sizes: Sequence[tuple[int, int]] = TIMING_SIZES,
    nodes_to_exclude: Sequence[str] | None = None,
) -> dict:
    """Export ``model_uri`` in each of ``fmt`` (comma-separated), compare, gate and register, in the active run.

    The fp32 ONNX file is always made and checked against PyTorch (:func:`verify_onnx`); INT8 and FP16 are made from
    it. With ``data``, every format is scored on ``eval_split`` against PyTorch fp32 (mIoU and its delta in points,
    argmax agreement, ms per image at ``timing_sizes``, size): the table is logged as ``export/formats.json`` and
    each row as tags on the format's registered version. A format more than ``max_miou_drop`` points below PyTorch
    fp32 is neither logged as a model nor registered. Registered names: ``registered_model`` for fp32 ONNX, plus
    ``-int8`` / ``-fp16``; when ``model_uri`` names a registered version, each is linked to it
    (:func:`segmentation.mlops.companions.link_companion`) and follows its ``production``/``previous`` aliases.

    Returns:
        The fp32 parity numbers, ``model_uri``/``registered_version``/``aliases`` of the fp32 ONNX model (``None``
        when ``onnx`` is not among the formats), ``formats`` (per format: its table row and the same three keys)
        and ``table`` (every row, PyTorch fp32 first).

    Raises:
        ValueError: an unknown format, INT8/FP16 without ``data``, or a ``model_uri`` that is no segmentation model.
        ParityError: the fp32 ONNX file disagrees with PyTorch (the metrics are logged before raising).
        FormatRefused: after logging and registering the others, when a format failed the accuracy gate.
    """
    formats = parse_formats(fmt)
    _check(formats, data, calibration_images, max_miou_drop, opset)
    model, classes, meta = load_model_with_meta(model_uri)
    model_cfg = SimpleNamespace(arch=meta["arch"], num_classes=int(meta["num_classes"]))
    source = registry.describe_model_uri(model_uri)
    calibration = load_images(data, split_id, "train", classes, calibration_images) if data else None
    evaluation = load_images(data, split_id, eval_split, classes) if data else None
    result: dict = {"model_uri": None, "registered_version": None, "aliases": {}, "formats": {}, "table": []}
    refused: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        fp32 = Path(tmp) / ONNX_FILE
        export_onnx(model, fp32, opset=opset, fuse_bn=fuse_bn)
        try:
            parity = verify_onnx(model, fp32, sizes)
        except ParityError as exc:  # keep the numbers on the failed run, then fail the step
            mlflow.log_metrics({f"export/{k}": v for k, v in exc.result.items()})
            raise
        mlflow.log_metrics({f"export/{k}": v for k, v in parity.items()})
        result.update(parity)
        files = {f: _build(f, fp32, Path(tmp), calibration, nodes_to_exclude) for f in formats}
        rows = {f: {"format": f, "size MB": file_size(p) / 1e6} for f, p in files.items()}
        if evaluation is not None:
            args = (evaluation, classes.num_classes, classes.ignore_index)
            reference, masks = pytorch_row(model, *args, timing_sizes=timing_sizes)
            result["table"].append(reference)
            for f, path in files.items():
                time_it = f != "onnx-fp16" or torch.cuda.is_available()  # onnxruntime here runs on the CPU
                if not time_it:
                    logger.warning("%s is %s; its timing is skipped on this machine", f, CPU_ONLY_NOTE)
                predictor = Predictor.from_onnx(path)
                rows[f] = format_row(
                    f,
                    predictor,
                    evaluation,
                    masks,
                    reference["mIoU"],
                    *args[1:],
                    file_size(path),
                    timing_sizes,
                    time_it,
                )
                result["table"].append(rows[f])
                mlflow.log_metrics({f"export/{f}/{k}": v for k, v in _numbers(rows[f]).items()})
                why = gate(rows[f], reference["mIoU"], max_miou_drop)
                if why:
                    refused.append(why)
                    mlflow.set_tag(f"export/refused/{f}", why)
                    logger.error(why)
            mlflow.log_table(pd.DataFrame(result["table"]), TABLE_FILE)
        refused_formats = {r.split(":")[0].removeprefix("format ") for r in refused}
        for f, path in files.items():
            if f in refused_formats:
                continue
            mlflow.log_artifact(str(path), f)
            name = f"{registered_model}{SUFFIXES[f]}" if registered_model else None
            info = log_onnx_model(
                path, classes, model_cfg, name=f"{f.replace('-', '_')}_model", registered_model_name=name, fmt=f
            )
            entry = {**rows[f], "model_uri": info.model_uri, "registered_version": info.registered_model_version}
            entry["aliases"] = {}
            if name:
                for key, value in _tags(rows[f]).items():
                    MlflowClient().set_model_version_tag(name, info.registered_model_version, key, value)
                if result["table"]:  # the whole table, this format in bold, where the version page shows it
                    MlflowClient().update_model_version(
                        name, info.registered_model_version, description=_description(result["table"], f, model_uri)
                    )
            if source.name and source.version:
                if name:
                    entry["aliases"] = companions.link_companion(
                        name, info.registered_model_version, source.name, source.version
                    )
            result["formats"][f] = entry
            if f == "onnx":
                result.update({k: entry[k] for k in ("model_uri", "registered_version", "aliases")})
        if source.name and source.version:
            mlflow.set_tags({companions.SOURCE_NAME_TAG: source.name, companions.SOURCE_VERSION_TAG: source.version})
        if refused:  # inside the run, so that it ends FAILED, as the step's exit code says
            raise FormatRefused("; ".join(refused), result)
    return result
