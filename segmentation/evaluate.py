"""Evaluation on a whole split, scored the way the Cityscapes benchmark scores it.

One confusion matrix is accumulated over every pixel of the split (label 255 ignored) and IoU is computed from it
once, so large images weigh more than small ones and a class is scored over the whole split, not per image. Images
are predicted at full resolution; test-time augmentation (flip, multiscale) and sliding windows average *logits*.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segmentation.config import EvalConfig
from segmentation.data.classes import ClassInfo
from segmentation.metrics import confusion_matrix, scores
from segmentation.models import MIN_INPUT_SIDE
from segmentation.models.preprocessing import MEAN_BGR, STD_BGR

TTA_MODES = ("none", "flip", "multiscale")
_DEFAULTS = EvalConfig()


@dataclass(frozen=True)
class Latency:
    """Model time per image (forward passes, TTA and argmax included; data loading excluded)."""

    ms_per_image: float
    images_per_s: float
    device: str
    num_images: int
    backend: str = "eager"


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


def _window_starts(size: int, window: int) -> list[int]:
    # One third overlap; the last window is flush with the far edge so every pixel is covered.
    stride = max(1, window * 2 // 3)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _forward(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, sliding_window: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    # The encoder downsamples 64x: pad small inputs (zeros = the mean colour after normalisation), crop after.
    pad_h, pad_w = max(0, MIN_INPUT_SIDE - height), max(0, MIN_INPUT_SIDE - width)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    if not sliding_window or (full_h <= sliding_window and full_w <= sliding_window):
        return model(image)[..., :height, :width]
    win_h, win_w = min(sliding_window, full_h), min(sliding_window, full_w)
    logits = count = None
    for y in _window_starts(full_h, win_h):
        for x in _window_starts(full_w, win_w):
            out = model(image[..., y : y + win_h, x : x + win_w])
            if logits is None:
                logits = out.new_zeros((*out.shape[:2], full_h, full_w))
                count = out.new_zeros((1, 1, full_h, full_w))
            logits[..., y : y + win_h, x : x + win_w] += out
            count[..., y : y + win_h, x : x + win_w] += 1
    return (logits / count)[..., :height, :width]


def build_runner(model: nn.Module, backend: str = "eager", device: str | torch.device = "cpu") -> Callable:
    """The callable that runs the network: the module itself (``eager``), or a
    :class:`segmentation.inference.Predictor` (BN folded; ``channels_last``, ``onnxruntime`` or ``auto``)."""
    model = model.to(device).eval()
    if backend == "eager":
        return model
    from segmentation.inference import Predictor  # raises ValueError listing the backends for an unknown one

    return Predictor(model, backend)


def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, tta: str = "none",
                   scales: Sequence[float] = tuple(_DEFAULTS.scales), sliding_window: int = 0) -> torch.Tensor:
    """Logits for a batch at its own resolution, with optional test-time augmentation.

    Args:
        model: returns ``N x C x h x w`` logits for an ``N x 3 x h x w`` input (a module in eval mode, or the
            result of :func:`build_runner`).
        image: normalised input batch.
        tta: ``none``; ``flip`` averages with the prediction on the horizontally flipped input; ``multiscale``
            resizes the input bilinearly by each of ``scales`` and averages the logits resized back to input size.
        scales: resize factors for ``multiscale``.
        sliding_window: window side in pixels; inputs larger than it are predicted in overlapping windows whose
            logits are averaged. 0 predicts the whole image at once.

    Returns:
        ``N x C x H x W`` logits.

    Shape:
        image ``N x 3 x H x W`` -> ``N x C x H x W``.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; allowed: {', '.join(TTA_MODES)}")
    if tta == "none":
        return _forward(model, image, sliding_window)
    if tta == "flip":
        flipped = _forward(model, image.flip(-1), sliding_window).flip(-1)
        return (_forward(model, image, sliding_window) + flipped) / 2
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(image, size, mode="bilinear",
                                                                     align_corners=False)
        logits = _forward(model, scaled, sliding_window)
        if size != (height, width):
            logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
    return total / len(scales)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. ``NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC ... (2 threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    return f"{device.type}: {cpu} ({torch.get_num_threads()} threads)"


def _to_bgr(image: torch.Tensor) -> np.ndarray:
    array = image.cpu().numpy().transpose(1, 2, 0) * STD_BGR + MEAN_BGR
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _image_name(dataset: Dataset, index: int) -> str:
    names = getattr(dataset, "image_names", None)
    if names is not None:
        return str(names[index])
    paths = getattr(dataset, "images", None)  # SegmentationDataset keeps the image paths
    if paths is not None and isinstance(paths[index], (str, os.PathLike)):
        return os.path.basename(paths[index])
    return f"#{index}"


def _validate(dataset: Dataset, tta: str, scales: Sequence[float], sliding_window: int, batch_size: int) -> None:
    if len(dataset) == 0:
        raise ValueError("the evaluation split is empty: no images to evaluate (check the split name and table)")
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; allowed: {', '.join(TTA_MODES)}")
    if tta == "multiscale" and (not scales or any(s <= 0 for s in scales)):
        raise ValueError(f"tta=multiscale needs positive scales, got {list(scales)}")
    if sliding_window and sliding_window < MIN_INPUT_SIDE:
        raise ValueError(f"sliding_window={sliding_window} is below the model's minimum input side "
                         f"{MIN_INPUT_SIDE}; use 0 (whole image) or >= {MIN_INPUT_SIDE}")
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


def evaluate_model(model: nn.Module, classes: ClassInfo, dataset: Dataset, *, data_classes: ClassInfo | None = None,
                   batch_size: int = _DEFAULTS.batch_size, tta: str = _DEFAULTS.tta,
                   scales: Sequence[float] = tuple(_DEFAULTS.scales), sliding_window: int = _DEFAULTS.sliding_window,
                   num_worst: int = _DEFAULTS.num_worst, device: str | torch.device = "cpu",
                   backend: str = "eager", num_workers: int = 0, prefix: str = "eval") -> EvalResult:
    """Predict every image of ``dataset`` at full resolution and score the split as one confusion matrix.

    Args:
        model: segmentation network returning logits at input size.
        classes: the model's classes (names, colours, ignore index).
        dataset: items ``(image, mask)``: normalised float ``3 x H x W`` and int ``H x W`` (255 = ignore). An
            ``image_names`` (or ``images``, paths) attribute, when present, names the worst images.
        data_classes: the dataset's classes; when given they must equal ``classes``.
        batch_size: images per forward pass (runs of equal-sized images only).
        tta, scales, sliding_window: see :func:`predict_logits`.
        num_worst: how many lowest-mIoU images to keep for inspection.
        device: where the model runs.
        backend: ``eager`` runs the module as it is; ``auto``, ``channels_last`` or ``onnxruntime`` run the
            deployed path (:mod:`segmentation.inference`), so latency is what serving sees.
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
    _validate(dataset, tta, scales, sliding_window, batch_size)
    device = torch.device(device)
    runner = build_runner(model, backend, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=list, pin_memory=device.type == "cuda")
    num_classes, ignore = classes.num_classes, classes.ignore_index
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    per_image: list[tuple[str, float]] = []
    worst: list[WorstImage] = []
    timings: list[tuple[float, int]] = []
    index = 0
    with torch.inference_mode():
        for images, masks in _batches(loader):
            start = time.perf_counter()
            logits = predict_logits(runner, images.to(device), tta=tta, scales=scales, sliding_window=sliding_window)
            preds = logits.argmax(1).cpu()  # .cpu() waits for the device, so the timing is complete
            timings.append((time.perf_counter() - start, len(images)))
            for image, mask, pred in zip(images, masks, preds, strict=True):
                image_matrix = confusion_matrix(pred, mask, num_classes, ignore)
                matrix += image_matrix
                miou = float(scores(image_matrix)["mIoU"])
                name = _image_name(dataset, index)
                per_image.append((name, miou))
                if num_worst > 0 and not math.isnan(miou) and (len(worst) < num_worst or miou < worst[-1].miou):
                    worst.append(WorstImage(index, name, miou, _to_bgr(image), mask.numpy().astype(np.uint8),
                                            pred.numpy().astype(np.uint8)))
                    worst = sorted(worst, key=lambda w: (w.miou, w.index))[:num_worst]
                index += 1
    latency = _latency(timings, device, getattr(runner, "backend", "eager"))
    return _result(matrix.numpy(), classes, per_image, worst, latency, prefix)


def _latency(timings: list[tuple[float, int]], device: torch.device, backend: str) -> Latency:
    # The first batch pays for lazy initialisation (allocator, kernels); leave it out when there are others.
    kept = timings[1:] if len(timings) > 1 else timings
    seconds, images = sum(t for t, _ in kept), sum(n for _, n in kept)
    return Latency(1000 * seconds / images, images / seconds if seconds > 0 else float("inf"),
                   device_name(device), sum(n for _, n in timings), backend)


def _result(matrix: np.ndarray, classes: ClassInfo, per_image: list[tuple[str, float]], worst: list[WorstImage],
            latency: Latency, prefix: str) -> EvalResult:
    summary = scores(torch.from_numpy(matrix))
    iou, class_acc = [float(v) for v in summary["iou"]], [float(v) for v in summary["class_acc"]]
    metrics = {f"{prefix}/mIoU": float(summary["mIoU"]), f"{prefix}/pixel_acc": float(summary["pixel_acc"]),
               f"{prefix}/mean_acc": float(summary["mean_acc"])}
    present = [(name, v) for name, v in zip(classes.names, iou, strict=True) if not math.isnan(v)]
    metrics.update({f"{prefix}/IoU/{name}": v for name, v in present})
    metrics.update({f"{prefix}/latency_ms_per_image": latency.ms_per_image, f"{prefix}/images_per_s":
                    latency.images_per_s, f"{prefix}/num_images": float(latency.num_images)})
    return EvalResult(classes, matrix, metrics, iou, class_acc, per_image, worst, latency)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

