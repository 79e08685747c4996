"""Segmentation metrics from a confusion matrix accumulated over a whole split (not averaged per image).

Rows are ground truth, columns predictions. Matrices from several processes or shards merge by summation.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Count (ground truth, prediction) pairs over the labelled pixels.

    Pixels whose target is ``ignore_index`` or outside ``[0, num_classes)`` are left out, as in the reference.

    Args:
        pred: predicted class indices (e.g. ``logits.argmax(1)``).
        target: ground-truth class indices.
        num_classes: C.
        ignore_index: label value left out.

    Returns:
        An int64 ``(C, C)`` tensor on the device of ``pred``; ``[i, j]`` counts pixels of class i predicted as j.

    Shape:
        - pred and target: the same shape, any number of dimensions (``(N, H, W)`` typically).

    Raises:
        ValueError: shapes differ or a prediction is outside ``[0, num_classes)``.
    """
    pred = _as_tensor(pred)
    target = _as_tensor(target).to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), found values in [{int(pred.min())}, {int(pred.max())}]"
        )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(matrix: torch.Tensor | np.ndarray) -> dict[str, float | list[float]]:
    """Metrics of a confusion matrix.

    Args:
        matrix: ``(C, C)`` counts, rows = ground truth.

    Returns:
        ``mIoU`` (nanmean of the per-class IoU), ``pixel_acc``, ``mean_acc`` (nanmean of per-class recall),
        ``iou`` and ``class_acc`` (lists of C floats, NaN for a class absent
        from both ground truth and predictions, resp. from the ground truth). Empty matrices give NaN.
    """
    m = _as_tensor(matrix).detach().double().cpu()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (C, C) confusion matrix, got shape {tuple(m.shape)}")
    diag, gt, predicted = m.diag(), m.sum(1), m.sum(0)
    total = m.sum()
    union = gt + predicted - diag
    iou = torch.where(union > 0, diag / union.clamp(min=1), torch.nan)
    class_acc = torch.where(gt > 0, diag / gt.clamp(min=1), torch.nan)
    return {
        "mIoU": float(iou.nanmean()),
        "pixel_acc": float(diag.sum() / total) if total > 0 else math.nan,
        "mean_acc": float(class_acc.nanmean()),
        "iou": iou.tolist(),
        "class_acc": class_acc.tolist(),
    }
