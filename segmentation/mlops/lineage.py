"""Record what a preprocess run produced in MLflow: the split table as a dataset input, pixel counts, overlays.

Logs into the active run; under ``mlflow run`` (where
``MLFLOW_RUN_ID`` is set) it attaches to that run with ``mlflow.start_run()``. Without either it does nothing,
so ``preprocess`` also works with no tracking at all.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd

from segmentation.data.classes import ClassInfo, overlay

SPLIT_PRIORITY = ("val", "train", "test")


def _side_by_side(image_bgr: np.ndarray, mask: np.ndarray, classes: ClassInfo) -> np.ndarray:
    """``image | image with its mask blended in``, ``H x 2W x 3`` uint8 RGB, as MLflow shows images."""
    return np.concatenate([image_bgr, overlay(image_bgr, mask, classes)], axis=1)[..., ::-1]


def log_preprocess_lineage(
    table_path: str | Path, name: str | None = None, num_overlays: int = 4, unread: tuple[str, ...] = ()
) -> bool:
    """Log the split table written by ``run_preprocess`` into the active (or ``MLFLOW_RUN_ID``) run.

    Logs: the table as a dataset input (context ``preprocess``, digest over every image and mask), metrics
    ``data/num_samples/<split>`` and ``data/pixels/<split>/<class>``, artifacts ``data/stats.json``,
    ``data/classes.csv`` and ``num_overlays`` overlay images ``data/overlays/<i>.png``; the tag
    ``preprocess.unread_params`` names the run's params the dataset did not read (``unread``).

    Returns:
        ``True`` when something was logged, ``False`` when no run is active and ``MLFLOW_RUN_ID`` is unset.
    """
    if mlflow.active_run() is None and not os.environ.get("MLFLOW_RUN_ID"):
        return False
    table_path = Path(table_path)
    out_dir = table_path.parent.parent
    stats = json.loads(table_path.with_suffix(".stats.json").read_text())
    classes = ClassInfo.read_csv(table_path.parent / "classes.csv")
    table = pd.read_parquet(table_path)
    with contextlib.ExitStack() as stack:
        if mlflow.active_run() is None:
            stack.enter_context(mlflow.start_run())  # resumes the run that `mlflow run` created
        dataset = mlflow.data.from_pandas(
            table,
            source=str(table_path.resolve()),
            name=name or f"{stats['dataset']}-{stats['split_id']}",
            digest=stats["digest"][:32],
        )
        mlflow.log_input(dataset, context="preprocess")
        mlflow.set_tag("preprocess.unread_params", ",".join(unread) or "none")
        metrics = {f"data/num_samples/{split}": float(n) for split, n in stats["num_samples"].items()}
        for split, counts in stats["pixels"].items():
            metrics.update({f"data/pixels/{split}/{cls}": float(n) for cls, n in counts.items()})
            metrics[f"data/pixels/{split}/ignore"] = float(stats["ignore_pixels"][split])
        mlflow.log_metrics(metrics)
        mlflow.log_dict(stats, "data/stats.json")
        mlflow.log_artifact(str(table_path.parent / "classes.csv"), artifact_path="data")
        rank = table["split"].map({s: i for i, s in enumerate(SPLIT_PRIORITY)}).fillna(len(SPLIT_PRIORITY))
        for i, row in enumerate(
            table.assign(_rank=rank).sort_values(["_rank"], kind="stable").head(num_overlays).itertuples()
        ):
            image = cv2.imread(str(out_dir / row.image), cv2.IMREAD_COLOR)
            mask = cv2.imread(str(out_dir / row.mask), cv2.IMREAD_UNCHANGED)
            mlflow.log_image(_side_by_side(image, mask, classes), artifact_file=f"data/overlays/{i}_{row.split}.png")
    return True
