"""The MLflow side of evaluation and prediction: what an evaluation or a prediction logs into its run.

Metrics, a per-class table, a confusion-matrix heatmap, IoU bars and the worst images go into the evaluation run,
which is linked to the model by tags (``model_name``, ``model_version``, ``model_run_id``, ``model_uri``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.dataset import Dataset
from mlflow.entities import LoggedModelInput

from segmentation.evaluation.evaluate import EvalResult, WorstImage
from segmentation.evaluation.visualize import render_confusion_matrix, render_iou_bars, render_panel


def per_class_table(result: EvalResult) -> pd.DataFrame:
    """One row per class: IoU, accuracy (recall), ground-truth and predicted pixel counts."""
    return pd.DataFrame(
        {
            # object, not pandas' str dtype: mlflow.log_table selects object columns and warns about str ones.
            "class_id": range(result.classes.num_classes),
            "class": pd.Series(result.classes.names, dtype=object),
            "iou": result.iou,
            "accuracy": result.class_acc,
            "gt_pixels": result.matrix.sum(1).astype(np.int64),
            "pred_pixels": result.matrix.sum(0).astype(np.int64),
        }
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def _worst_title(rank: int, worst: WorstImage) -> str:
    return f"worst #{rank + 1}: {worst.name}  mIoU {worst.miou:.3f}"


def log_evaluation(
    result: EvalResult,
    tags: Mapping[str, str] | None = None,
    prefix: str = "eval",
    dataset: Dataset | None = None,
    model_id: str | None = None,
) -> None:
    """Log an evaluation into the active MLflow run: metrics, tables, heatmap, IoU bars, worst panels, tags.

    With ``dataset`` it is logged as the run's ``evaluation`` input and the metrics are linked to it; with
    ``model_id`` (the evaluated LoggedModel) they are linked to the model too, so its page shows its scores.
    """
    if dataset is not None:
        model = LoggedModelInput(model_id) if model_id else None
        mlflow.log_input(dataset, context="evaluation", model=model)
    mlflow.log_metrics(result.metrics, dataset=dataset, model_id=model_id)
    mlflow.log_table(per_class_table(result), artifact_file=f"{prefix}/per_class.json")
    per_image = pd.DataFrame(
        {"image": pd.Series([n for n, _ in result.per_image], dtype=object), "miou": [v for _, v in result.per_image]}
    )
    mlflow.log_table(per_image, artifact_file=f"{prefix}/per_image.json")
    header = ",".join(["truth\\pred", *result.classes.names])
    lines = [",".join([name, *map(str, row)]) for name, row in zip(result.classes.names, result.matrix, strict=True)]
    mlflow.log_text("\n".join([header, *lines]) + "\n", f"{prefix}/confusion_matrix.csv")
    mlflow.log_image(
        render_confusion_matrix(result.matrix, result.classes.names), artifact_file=f"{prefix}/confusion_matrix.png"
    )
    mlflow.log_image(
        render_iou_bars(result.iou, result.classes, result.metrics.get(f"{prefix}/mIoU")),
        artifact_file=f"{prefix}/iou_per_class.png",
    )
    for rank, worst in enumerate(result.worst):
        panel = render_panel(worst.image_bgr, worst.mask, worst.pred, result.classes, _worst_title(rank, worst))
        mlflow.log_image(panel, artifact_file=f"{prefix}/worst/{rank:02d}_{_slug(worst.name)}.png")
    run_tags = (
        {f"{prefix}/device": result.latency.device, f"{prefix}/backend": result.latency.backend}
        if result.latency
        else {}
    )
    mlflow.set_tags({**run_tags, **(tags or {})})


def log_overlays(overlays: Sequence[tuple[str, np.ndarray]], prefix: str = "predict/overlays") -> int:
    """Log ``(name, RGB image)`` pairs into the active run, if there is one; returns how many were logged."""
    if mlflow.active_run() is None:
        return 0
    for name, image in overlays:
        mlflow.log_image(image, artifact_file=f"{prefix}/{_slug(name)}.png")
    return len(overlays)


def data_key(
    table: pd.DataFrame,
    split: str,
    split_id: str,
    tta: str = "none",
    sliding_window: int = 0,
    scales: Sequence[float] = (),
    root: str | Path | None = None,
) -> str:
    """Identify what a score was measured on: the split's rows (image and mask paths relative to the data root and,
    with ``root``, the bytes of those files) and the TTA protocol, e.g. ``split01/val#1f2e3d4c5b6a|tta=none`` or
    ``...|tta=multiscale,scales=0.75:1.0:1.25`` (``scales`` count only for ``multiscale``).

    Two scores are comparable only when their keys are equal; the key does not depend on where the data lives, and
    with ``root`` a split rebuilt under the same file names (another resolution, seed or source) gets another key.
    """
    rows = table[table["split"] == split]
    digest = hashlib.sha256()
    for image, mask in zip(rows["image"], rows["mask"], strict=True):
        digest.update(f"{image}\t{mask}\n".encode())
        if root is not None:
            for name in (image, mask):
                with open(Path(root) / name, "rb") as fh:
                    digest.update(hashlib.file_digest(fh, "sha256").digest())
    protocol = f"tta={tta}"
    if tta == "multiscale":
        protocol += ",scales=" + ":".join(repr(float(scale)) for scale in scales)
    if sliding_window:
        protocol += f",window={sliding_window}"
    return f"{split_id}/{split}#{digest.hexdigest()[:12]}|{protocol}"
