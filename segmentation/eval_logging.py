"""The MLflow side of evaluation and prediction: what gets logged, and the runs that evaluate and promote models.

Metrics, a per-class table, a confusion-matrix heatmap, IoU bars and the worst images go into the evaluation run,
which is linked to the model by tags (``model_name``, ``model_version``, ``model_run_id``, ``model_uri``). The
headline number is also written onto the registered version so that promotion can compare versions without
searching every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from segmentation import registry
from segmentation.config import AugmentationConfig, EvalConfig
from segmentation.evaluate import EvalResult, WorstImage, check_classes, evaluate_model, resolve_device
from segmentation.visualize import render_confusion_matrix, render_iou_bars, render_panel  # engine imports these here

logger = logging.getLogger(__name__)
_DEFAULTS = EvalConfig()


def per_class_table(result: EvalResult) -> pd.DataFrame:
    """One row per class: IoU, accuracy (recall), ground-truth and predicted pixel counts."""
    return pd.DataFrame({
        # object, not pandas' str dtype: mlflow.log_table selects object columns and warns about str ones.
        "class_id": range(result.classes.num_classes), "class": pd.Series(result.classes.names, dtype=object),
        "iou": result.iou, "accuracy": result.class_acc,
        "gt_pixels": result.matrix.sum(1).astype(np.int64), "pred_pixels": result.matrix.sum(0).astype(np.int64),
    })


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def _worst_title(rank: int, worst: WorstImage) -> str:
    return f"worst #{rank + 1}: {worst.name}  mIoU {worst.miou:.3f}"


def log_evaluation(result: EvalResult, tags: Mapping[str, str] | None = None, prefix: str = "eval") -> None:
    """Log an evaluation into the active MLflow run: metrics, tables, heatmap, IoU bars, worst panels, tags."""
    mlflow.log_metrics(result.metrics)
    mlflow.log_table(per_class_table(result), artifact_file=f"{prefix}/per_class.json")
    per_image = pd.DataFrame({"image": pd.Series([n for n, _ in result.per_image], dtype=object),
                              "miou": [v for _, v in result.per_image]})
    mlflow.log_table(per_image, artifact_file=f"{prefix}/per_image.json")
    header = ",".join(["truth\\pred", *result.classes.names])
    lines = [",".join([name, *map(str, row)]) for name, row in zip(result.classes.names, result.matrix, strict=True)]
    mlflow.log_text("\n".join([header, *lines]) + "\n", f"{prefix}/confusion_matrix.csv")
    mlflow.log_image(render_confusion_matrix(result.matrix, result.classes.names),
                     artifact_file=f"{prefix}/confusion_matrix.png")
    mlflow.log_image(render_iou_bars(result.iou, result.classes, result.metrics.get(f"{prefix}/mIoU")),
                     artifact_file=f"{prefix}/iou_per_class.png")
    for rank, worst in enumerate(result.worst):
        panel = render_panel(worst.image_bgr, worst.mask, worst.pred, result.classes, _worst_title(rank, worst))
        mlflow.log_image(panel, artifact_file=f"{prefix}/worst/{rank:02d}_{_slug(worst.name)}.png")
    run_tags = {f"{prefix}/device": result.latency.device, f"{prefix}/backend": result.latency.backend} \
        if result.latency else {}
    mlflow.set_tags({**run_tags, **(tags or {})})


def log_overlays(overlays: Sequence[tuple[str, np.ndarray]], prefix: str = "predict/overlays") -> int:
    """Log ``(name, RGB image)`` pairs into the active run, if there is one; returns how many were logged."""
    if mlflow.active_run() is None:
        return 0
    for name, image in overlays:
        mlflow.log_image(image, artifact_file=f"{prefix}/{_slug(name)}.png")
    return len(overlays)


def data_key(table: pd.DataFrame, split: str, split_id: str, tta: str = "none", sliding_window: int = 0) -> str:
    """Identify what a score was measured on: the split's rows (image and mask paths relative to the data root)
    and the TTA protocol, e.g. ``split01/val#1f2e3d4c5b6a|tta=none``.

    Two scores are comparable only when their keys are equal; the key does not depend on where the data lives.
    """
    rows = table[table["split"] == split]
    digest = hashlib.sha256()
    for image, mask in zip(rows["image"], rows["mask"], strict=True):
        digest.update(f"{image}\t{mask}\n".encode())
    protocol = f"tta={tta}" + (f",window={sliding_window}" if sliding_window else "")
    return f"{split_id}/{split}#{digest.hexdigest()[:12]}|{protocol}"


def format_summary(result: EvalResult, prefix: str = "eval") -> str:
    """A plain-text report: headline metrics, IoU per class, latency and the worst images."""
    m = result.metrics
    lines = [f"mIoU {m[f'{prefix}/mIoU']:.4f}   pixel acc {m[f'{prefix}/pixel_acc']:.4f}   "
             f"mean acc {m[f'{prefix}/mean_acc']:.4f}   ({result.latency.num_images} images)"]
    width = max(len(n) for n in result.classes.names)
    for name, iou, acc in zip(result.classes.names, result.iou, result.class_acc, strict=True):
        cells = "absent" if math.isnan(iou) else f"IoU {iou:.4f}  acc {acc:.4f}" if not math.isnan(acc) \
            else f"IoU {iou:.4f}  (not in ground truth)"
        lines.append(f"  {name:<{width}}  {cells}")
    lat = result.latency
    lines.append(f"latency {lat.ms_per_image:.1f} ms/image, {lat.images_per_s:.2f} images/s on {lat.device}, "
                 f"backend {lat.backend}")
    if result.worst:
        lines.append("worst images: " + ", ".join(f"{w.name} ({w.miou:.3f})" for w in result.worst))
    return "\n".join(lines)


@contextlib.contextmanager
def attached_run(run_name: str | None = None, create: bool = True) -> Iterator[str | None]:
    """Yield the id of the active run: the one ``mlflow run`` made (``MLFLOW_RUN_ID``), else a new one if
    ``create``. A run opened here is ended here, FAILED when the block raises."""
    if mlflow.active_run() is not None:
        yield mlflow.active_run().info.run_id
        return
    if not (os.environ.get("MLFLOW_RUN_ID") or create):
        yield None
        return
    from segmentation.tracking import start_run  # finds the experiment the way training does

    tracker = start_run(run_name=run_name, log_system_metrics=False)
    try:
        yield tracker.run_id
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


@dataclass(frozen=True)
class Protocol:
    """How an evaluation was run; stored on the model version so the same evaluation can be repeated."""

    data: str
    split: str = "val"
    split_id: str = "split01"
    batch_size: int = _DEFAULTS.batch_size
    tta: str = _DEFAULTS.tta
    scales: tuple[float, ...] = tuple(_DEFAULTS.scales)
    sliding_window: int = _DEFAULTS.sliding_window
    num_worst: int = _DEFAULTS.num_worst
    device: str = "auto"
    backend: str = "eager"

    def to_json(self) -> str:
        keys = ("data", "split", "split_id", "tta", "scales", "sliding_window")
        return json.dumps({k: getattr(self, k) for k in keys})


def _evaluate(model_uri: str, protocol: Protocol, num_worst: int) -> tuple[EvalResult, str]:
    from segmentation.data.datasets import SegmentationDataset, load_split
    from segmentation.data.transforms import build_val_transforms
    from segmentation.export import load_model

    model, classes = load_model(model_uri)
    table, data_classes, root = load_split(protocol.data, protocol.split_id)
    check_classes(classes, data_classes)
    # Default augmentation settings keep validation images at full resolution (val_height = val_width = 0).
    dataset = SegmentationDataset(table, protocol.split, build_val_transforms(AugmentationConfig()), root,
                                  num_classes=classes.num_classes, ignore_index=classes.ignore_index)
    result = evaluate_model(model, classes, dataset, batch_size=protocol.batch_size, tta=protocol.tta,
                            scales=protocol.scales, sliding_window=protocol.sliding_window, num_worst=num_worst,
                            device=resolve_device(protocol.device), backend=protocol.backend)
    return result, data_key(table, protocol.split, protocol.split_id, protocol.tta, protocol.sliding_window)


def _incumbent_evaluator(model_name: str, protocol: Protocol):
    def evaluate_incumbent(version: str) -> float:
        logger.info("production version %s has no score on this data: evaluating it now", version)
        result, _ = _evaluate(f"models:/{model_name}/{version}", protocol, num_worst=0)
        return result.metrics["eval/mIoU"]
    return evaluate_incumbent


def _promotion_tags(promotion: registry.Promotion) -> dict[str, str]:
    # promotion/companions: where the companion models' aliases (the ONNX export's production) now point.
    return {"promotion/promoted": str(promotion.promoted), "promotion/reason": promotion.reason,
            "promotion/companions": json.dumps(promotion.companions, sort_keys=True)}


def run_evaluation(model_uri: str, protocol: Protocol, promote: bool = False, force: bool = False,
                   alias: str = registry.PRODUCTION) -> tuple[EvalResult, registry.Promotion | None]:
    """Evaluate ``model_uri`` on ``protocol.data`` inside an MLflow run, log everything and optionally promote.

    Raises:
        ValueError: ``promote`` for a model that is not a registered version, classes that differ, or an
            unresolvable model URI (from :func:`segmentation.export.load_model`).
    """
    ref = registry.describe_model_uri(model_uri)
    if promote and not (ref.name and ref.version):
        raise ValueError(f"promote=true needs a registered model (models:/<name>/<version>, models:/<name>/latest "
                         f"or models:/<name>@alias), got model_uri={model_uri!r}")
    protocol = Protocol(**{**asdict(protocol), "data": str(Path(protocol.data).resolve())})
    with attached_run(run_name="evaluate") as run_id:
        result, key = _evaluate(model_uri, protocol, protocol.num_worst)
        tags = {**ref.tags, registry.DATA_TAG: key, "eval/split": protocol.split, "eval/tta": protocol.tta}
        log_evaluation(result, tags)
        mlflow.flush_async_logging()
        promotion = None
        if ref.name and ref.version:
            registry.record_evaluation(ref.name, ref.version, result.metrics["eval/mIoU"], key, run_id,
                                       extra_tags={registry.PROTOCOL_TAG: protocol.to_json()})
        if promote:
            promotion = registry.promote(ref.name, ref.version, alias=alias, candidate_value=result.metrics[
                "eval/mIoU"], data_key=key, evaluate_incumbent=_incumbent_evaluator(ref.name, protocol),
                force=force, run_id=run_id)
            mlflow.set_tags(_promotion_tags(promotion))
    return result, promotion


def run_promotion(model_name: str, version: str, alias: str = registry.PRODUCTION,
                  force: bool = False) -> registry.Promotion:
    """Promote a version using the number its last evaluation recorded; the incumbent is evaluated on the same
    data (from the candidate's ``eval/protocol`` tag) when it has no comparable number."""
    candidate = registry.get_version(model_name, version)
    protocol_json = candidate.tags.get(registry.PROTOCOL_TAG)
    evaluator = None
    if protocol_json:
        evaluator = _incumbent_evaluator(model_name, Protocol(**json.loads(protocol_json)))
    with attached_run(create=False) as run_id:
        promotion = registry.promote(model_name, version, alias=alias, force=force, evaluate_incumbent=evaluator,
                                     run_id=run_id or candidate.tags.get(registry.RUN_TAG))
        if run_id:
            mlflow.set_tags({**_promotion_tags(promotion), "model_name": model_name, "model_version": str(version)})
    return promotion
