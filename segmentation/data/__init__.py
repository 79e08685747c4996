"""Datasets: reading Cityscapes and CVAT exports, the synthetic street scenes, preprocessing and data loading.

``segmentation.data.lineage`` (MLflow logging) is not imported here, so that using the data pipeline does not
import MLflow.
"""

from segmentation.data.classes import IGNORE_INDEX, ClassInfo, colorize
from segmentation.data.datasets import (
    SegmentationDataset,
    build_dataloader,
    load_split,
    resolve_split_table,
    seed_worker,
)
from segmentation.data.preprocess import DATASETS, run_preprocess, split_table_path
from segmentation.data.synthetic import SYNTHETIC_CLASS_IDS, generate_scene
from segmentation.data.transforms import build_train_transforms, build_val_transforms

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASS_IDS",
    "ClassInfo",
    "SegmentationDataset",
    "build_dataloader",
    "build_train_transforms",
    "build_val_transforms",
    "colorize",
    "generate_scene",
    "load_split",
    "resolve_split_table",
    "run_preprocess",
    "seed_worker",
    "split_table_path",
]
