"""Evaluation on a whole split, scored the way the Cityscapes benchmark scores it.

One confusion matrix is accumulated over every pixel of the split (label 255 ignored) and IoU is computed from it
once, so large images weigh more than small ones and a class is scored over the whole split, not per image. Images
are predicted at full resolution; test-time augmentation (flip, multiscale) and sliding windows average *logits*.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from segmentation.config import EvalConfig
from segmentation.data.classes import ClassInfo
from segmentation.evaluation.metrics import confusion_matrix, scores
from segmentation.inference.predictor import DEFAULT_BACKEND, Predictor, device_name
from segmentation.inference.tta import check_tta_settings
from segmentation.models.preprocessing import to_bgr_image

_DEFAULTS = EvalConfig()


@dataclass(frozen=True)
class Latency:
    """Model time per image (forward passes, TTA and argmax included; data loading excluded)."""

    ms_per_image: float
    images_per_s: float
    device: str
    num_images: int
    backend: str = DEFAULT_BACKEND


@dataclass
class WorstImage:
    """One of the lowest-scoring images, kept with what is needed to draw image | ground truth | prediction."""

    index: int
    name: str
    miou: float
    image_bgr: np.ndarray
    mask: np.ndarray
    pred: np.ndarray


@dataclass
class EvalResult:
    """Everything an evaluation produced; ``metrics`` holds the numbers to log (``eval/...`` keys)."""

    classes: ClassInfo
    matrix: np.ndarray  # C x C int64, rows = ground truth, columns = prediction
    metrics: dict[str, float]
    iou: list[float]  # per class, NaN for classes absent from both ground truth and prediction
    class_acc: list[float]  # per class recall, NaN for classes absent from the ground truth
    per_image: list[tuple[str, float]] = field(default_factory=list)  # (name, mIoU of that image alone)
    worst: list[WorstImage] = field(default_factory=list)
    latency: Latency | None = None


def check_classes(model_classes: ClassInfo, data_classes: ClassInfo) -> None:
    """Raise ``ValueError`` unless the dataset's class names equal the model's, in the same order."""
    if tuple(model_classes.names) != tuple(data_classes.names):
        raise ValueError(
            "the dataset's classes differ from the model's, so its scores would be meaningless.\n"
            f"  model   ({model_classes.num_classes}): {list(model_classes.names)}\n"
            f"  dataset ({data_classes.num_classes}): {list(data_classes.names)}\n"
            "Evaluate on data preprocessed with the model's class table, or a model trained on this data."
        )


def _image_name(dataset: Dataset, index: int) -> str:
    names = getattr(dataset, "image_names", None)
    if names is not None:
        return str(names[index])
    paths = getattr(dataset, "images", None)  # SegmentationDataset keeps the image paths
    if paths is not None and isinstance(paths[index], (str, os.PathLike)):
        return os.path.basename(paths[index])
    return f"#{index}"


def _check_arguments(
    dataset: Dataset, tta: str, scales: Sequence[float], sliding_window: int, batch_size: int
) -> None:
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty: no images to evaluate (check the split name and table)")
    check_tta_settings(tta, scales, sliding_window)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _batches(loader: DataLoader):
    # Full-resolution images of one split may differ in size: stack runs of equal shape, never resize.
    for items in loader:
        start = 0
        for i in range(1, len(items) + 1):
            if i == len(items) or items[i][0].shape != items[start][0].shape:
                group = items[start:i]
                yield torch.stack([g[0] for g in group]), torch.stack([torch.as_tensor(g[1]) for g in group])
                start = i


def evaluate_model(
    model: nn.Module,
    classes: ClassInfo,
    dataset: Dataset,
    *,
    data_classes: ClassInfo | None = None,
    batch_size: int = _DEFAULTS.batch_size,
    tta: str = _DEFAULTS.tta,
    scales: Sequence[float] = tuple(_DEFAULTS.scales),
    sliding_window: int = _DEFAULTS.sliding_window,
    num_worst: int = _DEFAULTS.num_worst,
    device: str | torch.device = "cpu",
    backend: str = DEFAULT_BACKEND,
    num_workers: int = 0,
    prefix: str = "eval",
) -> EvalResult:
    """Predict every image of ``dataset`` at full resolution and score the split as one confusion matrix.

    Args:
        model: segmentation network returning logits at input size.
        classes: the model's classes (names, colours, ignore index).
        dataset: items ``(image, mask)``: normalised float ``3 x H x W`` and int ``H x W`` (255 = ignore). An
            ``image_names`` (or ``images``, paths) attribute, when present, names the worst images.
        data_classes: the dataset's classes; when given they must equal ``classes``.
        batch_size: images per forward pass (runs of equal-sized images only).
        tta, scales, sliding_window: see :func:`segmentation.inference.tta.predict_logits`.
        num_worst: how many lowest-mIoU images to keep for inspection.
        device: where the model runs.
        backend: ``eager`` runs the module as it is; ``auto``, ``channels_last`` or ``onnxruntime`` run the
            deployed path (:mod:`segmentation.inference.predictor`), so latency is what serving sees.
        num_workers: DataLoader workers.
        prefix: metric key prefix.

    Returns:
        An :class:`EvalResult`; ``metrics`` has ``<prefix>/mIoU``, ``pixel_acc``, ``mean_acc``, ``IoU/<class>``
        (classes present in ground truth or prediction), ``latency_ms_per_image``, ``images_per_s``, ``num_images``.

    Raises:
        ValueError: classes differ, empty split, or an invalid TTA / window setting.
    """
    if data_classes is not None:
        check_classes(classes, data_classes)
    _check_arguments(dataset, tta, scales, sliding_window, batch_size)
    device = torch.device(device)
    runner = Predictor(model.to(device).eval(), backend)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,
        pin_memory=device.type == "cuda",
    )
    num_classes, ignore = classes.num_classes, classes.ignore_index
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    per_image: list[tuple[str, float]] = []
    worst: list[WorstImage] = []
    timings: list[tuple[float, int]] = []
    index = 0
    with torch.inference_mode():
        progress = tqdm(total=len(dataset), desc="evaluate", unit="image", mininterval=2.0)
        for images, masks in _batches(loader):
            progress.update(len(images))
            start = time.perf_counter()
            preds = runner.predict_class_ids(images.to(device), tta=tta, scales=scales, sliding_window=sliding_window)
            preds = preds.cpu()  # waits for the device, so the timing is complete
            timings.append((time.perf_counter() - start, len(images)))
            for image, mask, pred in zip(images, masks, preds, strict=True):
                image_matrix = confusion_matrix(pred, mask, num_classes, ignore)
                matrix += image_matrix
                miou = float(scores(image_matrix)["mIoU"])
                name = _image_name(dataset, index)
                per_image.append((name, miou))
                if num_worst > 0 and not math.isnan(miou) and (len(worst) < num_worst or miou < worst[-1].miou):
                    worst.append(
                        WorstImage(
                            index,
                            name,
                            miou,
                            to_bgr_image(image),
                            mask.numpy().astype(np.uint8),
                            pred.numpy().astype(np.uint8),
                        )
                    )
                    worst = sorted(worst, key=lambda w: (w.miou, w.index))[:num_worst]
                index += 1
    latency = _latency(timings, device, runner.backend)
    return _result(matrix.numpy(), classes, per_image, worst, latency, prefix)


def _latency(timings: list[tuple[float, int]], device: torch.device, backend: str) -> Latency:
    # The first batch pays for lazy initialisation (allocator, kernels); leave it out when there are others.
    kept = timings[1:] if len(timings) > 1 else timings
    seconds, images = sum(t for t, _ in kept), sum(n for _, n in kept)
    return Latency(
        1000 * seconds / images,
        images / seconds if seconds > 0 else float("inf"),
        device_name(device),
        sum(n for _, n in timings),
        backend,
    )


def _result(
    matrix: np.ndarray,
    classes: ClassInfo,
    per_image: list[tuple[str, float]],
    worst: list[WorstImage],
    latency: Latency,
    prefix: str,
) -> EvalResult:
    summary = scores(torch.from_numpy(matrix))
    iou, class_acc = [float(v) for v in summary["iou"]], [float(v) for v in summary["class_acc"]]
    metrics = {
        f"{prefix}/mIoU": float(summary["mIoU"]),
        f"{prefix}/pixel_acc": float(summary["pixel_acc"]),
        f"{prefix}/mean_acc": float(summary["mean_acc"]),
    }
    present = [(name, v) for name, v in zip(classes.names, iou, strict=True) if not math.isnan(v)]
    metrics.update({f"{prefix}/IoU/{name}": v for name, v in present})
    metrics.update(
        {
            f"{prefix}/latency_ms_per_image": latency.ms_per_image,
            f"{prefix}/images_per_s": latency.images_per_s,
            f"{prefix}/num_images": float(latency.num_images),
        }
    )
    return EvalResult(classes, matrix, metrics, iou, class_acc, per_image, worst, latency)


def format_summary(result: EvalResult, prefix: str = "eval") -> str:
    """A plain-text report: headline metrics, IoU per class, latency and the worst images."""
    m = result.metrics
    lines = [
        f"mIoU {m[f'{prefix}/mIoU']:.4f}   pixel acc {m[f'{prefix}/pixel_acc']:.4f}   "
        f"mean acc {m[f'{prefix}/mean_acc']:.4f}   ({result.latency.num_images} images)"
    ]
    width = max(len(n) for n in result.classes.names)
    for name, iou, acc in zip(result.classes.names, result.iou, result.class_acc, strict=True):
        cells = (
            "absent"
            if math.isnan(iou)
            else f"IoU {iou:.4f}  acc {acc:.4f}"
            if not math.isnan(acc)
            else f"IoU {iou:.4f}  (not in ground truth)"
        )
        lines.append(f"  {name:<{width}}  {cells}")
    lat = result.latency
    lines.append(
        f"latency {lat.ms_per_image:.1f} ms/image, {lat.images_per_s:.2f} images/s on {lat.device}, "
        f"backend {lat.backend}"
    )
    if result.worst:
        lines.append("worst images: " + ", ".join(f"{w.name} ({w.miou:.3f})" for w in result.worst))
    return "\n".join(lines)
