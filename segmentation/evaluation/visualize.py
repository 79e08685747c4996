"""Pictures of segmentation results, drawn with OpenCV and numpy: confusion heatmap, IoU bars, panels, overlays.

All functions return RGB uint8 arrays (what ``mlflow.log_image`` expects) except :func:`overlay`, which stays in the
BGR order of its input image so that ``cv2.imwrite`` can write it directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from segmentation.data.classes import ClassInfo, colorize

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.4, color=_BLACK) -> None:
    cv2.putText(canvas, text, org, _FONT, scale, color, 1, cv2.LINE_AA)


def _text_width(text: str, scale: float = 0.4) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def render_confusion_matrix(matrix: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Row-normalised confusion matrix heatmap (rows: ground truth, columns: prediction) as RGB uint8.

    Cells show the percentage of a ground-truth class's pixels predicted as each class; rows of classes absent
    from the ground truth are grey.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    num_classes = len(names)
    cell = int(np.clip(760 // max(num_classes, 1), 16, 40))
    margin = max(_text_width(n) for n in names) + 12
    title_h = 28
    grid = num_classes * cell
    canvas = np.full((title_h + margin + grid + 8, margin + grid + 8, 3), 255, np.uint8)
    _text(canvas, "confusion matrix, % of ground-truth row (rows: truth, cols: prediction)", (6, 18), 0.45)
    rows = matrix.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, matrix / rows, np.nan)
    heat = cv2.applyColorMap(np.nan_to_num(norm * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    top, left = title_h + margin, margin
    for i in range(num_classes):
        for j in range(num_classes):
            color = _GREY if math.isnan(norm[i, j]) else tuple(int(c) for c in heat[i, j])
            y, x = top + i * cell, left + j * cell
            cv2.rectangle(canvas, (x, y), (x + cell - 1, y + cell - 1), color, -1)
            if cell >= 28 and not math.isnan(norm[i, j]) and matrix[i, j] > 0:
                label = f"{100 * norm[i, j]:.0f}"
                _text(
                    canvas,
                    label,
                    (x + (cell - _text_width(label, 0.35)) // 2, y + cell // 2 + 4),
                    0.35,
                    _BLACK if norm[i, j] > 0.6 else _WHITE,
                )
        _text(canvas, names[i], (4, top + i * cell + cell // 2 + 4))
    # Column labels: draw horizontally on a strip, then rotate it upright along the top edge.
    strip = np.full((cell * num_classes, margin, 3), 255, np.uint8)
    for j, name in enumerate(names):
        _text(strip, name, (6, j * cell + cell // 2 + 4))  # left end = bottom after the rotation
    canvas[title_h : title_h + margin, left : left + grid] = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return canvas


def render_iou_bars(iou: Sequence[float], classes: ClassInfo, miou: float | None = None) -> np.ndarray:
    """Horizontal bar per class (its colour, length = IoU), absent classes marked, mIoU as a vertical line."""
    row, bar_w = 22, 420
    margin = max(_text_width(n) for n in classes.names) + 12
    height = 30 + row * classes.num_classes + 10
    canvas = np.full((height, margin + bar_w + 70, 3), 255, np.uint8)
    _text(canvas, "IoU per class", (6, 18), 0.5)
    for i, (name, value) in enumerate(zip(classes.names, iou, strict=True)):
        y = 30 + i * row
        _text(canvas, name, (4, y + 15))
        if math.isnan(value):
            _text(canvas, "absent", (margin + 4, y + 15), 0.4, _GREY)
            continue
        color = tuple(int(c) for c in classes.colors[i])
        cv2.rectangle(canvas, (margin, y + 3), (margin + max(1, round(value * bar_w)), y + row - 3), color, -1)
        cv2.rectangle(canvas, (margin, y + 3), (margin + bar_w, y + row - 3), _GREY, 1)
        _text(canvas, f"{value:.3f}", (margin + bar_w + 6, y + 15))
    if miou is not None and not math.isnan(miou):
        x = margin + round(miou * bar_w)
        cv2.line(canvas, (x, 26), (x, height - 6), (220, 0, 0), 1)
        _text(canvas, f"mIoU {miou:.3f}", (min(x + 4, margin + bar_w - 60), 26), 0.4, (220, 0, 0))
    return canvas


def _fit(image: np.ndarray, width: int, interpolation: int) -> np.ndarray:
    if image.shape[1] <= width:
        return image
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    return cv2.resize(image, (width, height), interpolation=interpolation)


def render_panel(
    image_bgr: np.ndarray,
    mask: np.ndarray,
    pred: np.ndarray,
    classes: ClassInfo,
    title: str = "",
    max_width: int = 768,
) -> np.ndarray:
    """``image | ground truth | prediction`` side by side (RGB uint8), each at most ``max_width`` wide."""
    tiles = [
        _fit(image_bgr[..., ::-1], max_width, cv2.INTER_AREA),
        _fit(colorize(mask, classes), max_width, cv2.INTER_NEAREST),
        _fit(colorize(pred, classes), max_width, cv2.INTER_NEAREST),
    ]
    captions = ["image", "ground truth (black = ignored)", "prediction"]
    strip_h = 22
    out = []
    for tile, caption in zip(tiles, captions, strict=True):
        strip = np.full((strip_h, tile.shape[1], 3), 255, np.uint8)
        _text(strip, caption, (4, 15))
        out.append(np.vstack([strip, tile]))
    panel = np.hstack(out)
    if title:
        head = np.full((strip_h, panel.shape[1], 3), 255, np.uint8)
        _text(head, title, (4, 15), 0.45)
        panel = np.vstack([head, panel])
    return np.ascontiguousarray(panel)
