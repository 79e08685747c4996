"""How much accuracy and speed each deployment format of a network costs, and the gate that keeps bad ones out.

For every format the same images go through the deployed :class:`~segmentation.inference.predictor.Predictor`: mIoU
on an evaluation split (one confusion matrix over the split, as :mod:`segmentation.evaluation.evaluate` scores),
its difference to PyTorch fp32 in points (1 point = 0.01 mIoU), the fraction of pixels whose class equals PyTorch
fp32's (argmax agreement), median ms per image at given sizes, and the file size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segmentation.data.synthetic import generate_scene
from segmentation.evaluation.metrics import confusion_matrix, scores
from segmentation.inference.predictor import Predictor

logger = logging.getLogger(__name__)

TIMING_SIZES = ((512, 1024), (1024, 2048))
TIMING_REPEATS = 5
REFERENCE = "pytorch-fp32"
# ONNX Runtime's CPU provider has few float16 kernels: it casts around the rest, so timing FP16 there says nothing
# about the GPUs it is meant for.
CPU_ONLY_NOTE = "not a CPU format: timed on a GPU only"


@dataclass(frozen=True)
class EvalImage:
    """One evaluation image (BGR uint8) and its label mask (class ids, ``ignore_index`` for unlabelled)."""

    image: np.ndarray
    mask: np.ndarray


def predict_masks(predict, images: Sequence[EvalImage]) -> list[np.ndarray]:
    """``predict(image_bgr) -> H x W`` class ids for every image."""
    return [np.asarray(predict(item.image)) for item in images]


def mean_iou(masks: Sequence[np.ndarray], images: Sequence[EvalImage], num_classes: int, ignore_index: int) -> float:
    matrix = sum(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(item.mask), num_classes, ignore_index)
        for pred, item in zip(masks, images, strict=True)
    )
    return float(scores(matrix)["mIoU"])


def agreement(masks: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Fraction of all pixels (labelled or not) whose class id equals the reference's."""
    same = sum(int((a == b).sum()) for a, b in zip(masks, reference, strict=True))
    return same / sum(b.size for b in reference)


def time_predictor(predictor: Predictor, sizes: Sequence[tuple[int, int]], repeats: int = TIMING_REPEATS) -> dict:
    """Median ms of ``predict_mask`` on a street scene of each size (after one warm-up call): ``{"ms HxW": ms}``,
    and ``cpu share``: the lowest, over the sizes, median share of torch's threads' CPU time the process got (a
    shared machine slows runs that did not get their cores; compare rows with similar shares only)."""
    out, shares = {}, []
    for height, width in sizes:
        image, _ = generate_scene(height, width, seed=0)
        predictor.predict_mask(image)
        times, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            predictor.predict_mask(image)
            elapsed = time.perf_counter() - start
            times.append(1000 * elapsed)
            cpu.append((time.process_time() - start_cpu) / max(elapsed, 1e-9) / torch.get_num_threads())
        out[f"ms {height}x{width}"] = float(np.median(times))
        shares.append(float(np.median(cpu)))
    if shares:
        out["cpu share"] = min(shares)
    return out


def format_row(
    name: str,
    predictor: Predictor,
    images: Sequence[EvalImage],
    reference: Sequence[np.ndarray],
    reference_miou: float,
    num_classes: int,
    ignore_index: int,
    size_bytes: int,
    timing_sizes: Sequence[tuple[int, int]] = TIMING_SIZES,
    time_it: bool = True,
) -> dict:
    """One row of the formats table (see the module docstring); ``time_it=False`` leaves the ms columns empty."""
    masks = predict_masks(predictor.predict_mask, images)
    miou = mean_iou(masks, images, num_classes, ignore_index)
    row = {
        "format": name,
        "mIoU": miou,
        "mIoU delta (points)": 100 * (miou - reference_miou),
        "argmax agreement": agreement(masks, reference),
        "size MB": size_bytes / 1e6,
        "note": "" if time_it else CPU_ONLY_NOTE,
    }
    timings = time_predictor(predictor, timing_sizes) if time_it else {}
    row.update({f"ms {h}x{w}": timings.get(f"ms {h}x{w}") for h, w in timing_sizes})
    row["cpu share"] = timings.get("cpu share")
    return row


def reference_row(
    model: nn.Module,
    images: Sequence[EvalImage],
    num_classes: int,
    ignore_index: int,
    timing_sizes: Sequence[tuple[int, int]] = TIMING_SIZES,
) -> tuple[dict, list[np.ndarray]]:
    """The PyTorch fp32 row (eager; size = its parameters and buffers) and its masks, the reference of the others.

    The Predictor's eager backend folds BatchNorm into the convolutions, which changes logits by ~1e-6 only.
    """
    predictor = Predictor(model, backend="eager")
    masks = predict_masks(predictor.predict_mask, images)
    miou = mean_iou(masks, images, num_classes, ignore_index)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    row = {
        "format": REFERENCE,
        "mIoU": miou,
        "mIoU delta (points)": 0.0,
        "argmax agreement": 1.0,
        "size MB": size / 1e6,
        "note": "eager",
        **time_predictor(predictor, timing_sizes),
    }
    return row, masks


def gate(row: dict, reference_miou: float, max_miou_drop: float) -> str:
    """``""`` when the format may be registered, else why not (with the numbers)."""
    drop = 100 * (reference_miou - row["mIoU"])
    if not np.isfinite(row["mIoU"]) or drop > max_miou_drop:
        return (
            f"format {row['format']}: mIoU {100 * row['mIoU']:.2f} is {drop:.2f} points below PyTorch fp32 "
            f"{100 * reference_miou:.2f} (max_miou_drop {max_miou_drop:g} points; argmax agreement "
            f"{row['argmax agreement']:.4f}); not registered"
        )
    return ""


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size


def markdown_table(rows: Sequence[dict], highlight: str | None = None) -> str:
    """The formats table as Markdown (the registry renders a version's description as Markdown).

    Numbers are rounded for reading (mIoU in %, times in ms); an empty cell is a value not measured here. The row
    of ``highlight`` is bold.
    """
    columns = [c for c in rows[0] if c != "note"] + ["note"] if rows else []

    def cell(column: str, value) -> str:
        if value is None or value == "":
            return ""
        if isinstance(value, float):
            return (
                f"{100 * value:.2f}"
                if column == "mIoU"
                else f"{value:.4f}"
                if "agreement" in column
                else f"{value:.2f}"
            )
        return str(value)

    header = ["mIoU %" if c == "mIoU" else c for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [cell(c, row.get(c)) for c in columns]
        if row.get("format") == highlight:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
