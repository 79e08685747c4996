"""The ``preprocess`` step: a Cityscapes tree, a CVAT export or the built-in synthetic scenes -> masks and a split
table, with the table, pixel counts and overlays logged into the step's run under ``mlflow run``."""

from __future__ import annotations

from pathlib import Path

from segmentation.data.preprocess import UNREAD_SETTINGS, run_preprocess
from segmentation.mlops.lineage import log_preprocess_lineage


def preprocess_step(
    dataset: str,
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    split_id: str = "split01",
    val_fraction: float = 0.2,
    seed: int = 0,
    num_images: int = 200,
    height: int = 128,
    width: int = 256,
) -> Path:
    """Write masks and ``split/<split_id>.parquet`` under ``out_dir`` and log their lineage; returns the table path.

    The run's tag ``preprocess.unread_params`` names the settings this dataset does not read (the entry point has
    one parameter list for all three: a Cityscapes run records ``num_images`` but generates nothing).

    Raises:
        ValueError, FileNotFoundError: see :func:`segmentation.data.preprocess.run_preprocess`.
    """
    table = run_preprocess(
        dataset,
        raw_dir,
        out_dir,
        split_id=split_id,
        val_fraction=val_fraction,
        seed=seed,
        num_images=num_images,
        height=height,
        width=width,
    )
    log_preprocess_lineage(table, unread=UNREAD_SETTINGS[dataset])
    return table
