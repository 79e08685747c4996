"""Logits at the input's own size: the padding rule, sliding windows and test-time augmentation.

The network halves its input six times, so inputs smaller than :data:`MIN_INPUT_SIDE` on a side are padded with
zeros (the mean colour after normalisation) and the logits are cropped back. Sliding windows and test-time
augmentation (flip, multiscale) average *logits*, never class ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from segmentation.models import MIN_INPUT_SIDE

TTA_MODES = ("none", "flip", "multiscale")
DEFAULT_SCALES = (0.75, 1.0, 1.25)

Logits = Callable[[torch.Tensor], torch.Tensor]


def check_tta_settings(tta: str, scales: Sequence[float] = DEFAULT_SCALES, sliding_window: int = 0) -> None:
    """Raise ``ValueError`` naming the setting when a TTA mode, its scales or a window size cannot work."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; allowed: {', '.join(TTA_MODES)}")
    if tta == "multiscale" and (not scales or any(s <= 0 for s in scales)):
        raise ValueError(f"tta=multiscale needs positive scales, got {list(scales)}")
    if sliding_window and sliding_window < MIN_INPUT_SIDE:
        raise ValueError(
            f"sliding_window={sliding_window} is below the model's minimum input side {MIN_INPUT_SIDE}; use 0 "
            f"(whole image) or >= {MIN_INPUT_SIDE}"
        )


def pad_to_min_side(batch: torch.Tensor) -> torch.Tensor:
    """Zero-pad the bottom/right of ``N x 3 x H x W`` up to :data:`MIN_INPUT_SIDE` per side (a no-op when larger)."""
    height, width = batch.shape[-2:]
    pad_h, pad_w = max(0, MIN_INPUT_SIDE - height), max(0, MIN_INPUT_SIDE - width)
    return F.pad(batch, (0, pad_w, 0, pad_h)) if pad_h or pad_w else batch


def _window_starts(size: int, window: int) -> list[int]:
    # One third overlap; the last window is flush with the far edge so every pixel is covered.
    stride = max(1, window * 2 // 3)
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _forward(model: Logits, image: torch.Tensor, sliding_window: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    image = pad_to_min_side(image)
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


def predict_logits(
    model: Logits,
    image: torch.Tensor,
    *,
    tta: str = "none",
    scales: Sequence[float] = DEFAULT_SCALES,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Logits for a batch at its own resolution, with optional test-time augmentation.

    Args:
        model: returns ``N x C x h x w`` logits for an ``N x 3 x h x w`` input (e.g. a
            :class:`~segmentation.inference.predictor.Predictor`).
        image: normalised input batch.
        tta: ``none``; ``flip`` averages with the prediction on the horizontally flipped input; ``multiscale``
            resizes the input bilinearly by each of ``scales`` and averages the logits resized back to input size.
        scales: resize factors for ``multiscale``.
        sliding_window: window side in pixels; inputs larger than it are predicted in overlapping windows whose
            logits are averaged. 0 predicts the whole image at once.

    Shape:
        image ``N x 3 x H x W`` -> ``N x C x H x W``.

    Raises:
        ValueError: see :func:`check_tta_settings`.
    """
    check_tta_settings(tta, scales, sliding_window)
    if tta == "none":
        return _forward(model, image, sliding_window)
    if tta == "flip":
        flipped = _forward(model, image.flip(-1), sliding_window).flip(-1)
        return (_forward(model, image, sliding_window) + flipped) / 2
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = size != (height, width)
        scaled = F.interpolate(image, size, mode="bilinear", align_corners=False) if resized else image
        logits = _forward(model, scaled, sliding_window)
        if resized:
            logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
    return total / len(scales)
