"""Training losses: the reference's bootstrapped cross-entropy and plain (optionally class-weighted) cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("bootstrapped_ce", "ce")


def _match_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected logits (N, C, H, W) and target (N, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.shape[-2:] != target.shape[-2:]:
        # As the reference: logits of another size are resized to the labels, never the other way round.
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
    return logits.float()  # the loss in fp32 also under mixed precision


def bootstrapped_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    min_k: int = 4096,
    threshold: float = 0.3,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Bootstrapped (hard-pixel) cross-entropy of FC-HarDNet, per image then averaged over the batch.

    For each image the per-pixel cross-entropies are sorted in descending order; ignored pixels count with loss 0.
    If the loss at 0-based position ``min_k`` exceeds ``threshold``, the image's loss is the mean of all losses
    above ``threshold``; otherwise it is the mean of the ``min_k`` largest losses. When an image has at most
    ``min_k`` pixels, ``min_k`` is clamped to the pixel count and the image's loss is the mean over all its pixels
    (both branches give that value there).

    Args:
        logits: raw scores; resized bilinearly (``align_corners=True``) to the target size when they differ.
        target: class indices, ``ignore_index`` for pixels without a label.
        min_k: the number of hardest pixels always kept (4096 in the reference, for 1024x1024 crops).
        threshold: a loss value (not a probability): 0.3 means ``p_true < 0.74``.
        ignore_index: label value excluded from the loss.

    Returns:
        A scalar tensor.

    Shape:
        - logits: ``(N, C, H, W)``; target: ``(N, H, W)`` int64.

    Raises:
        ValueError: ``min_k < 1`` or mismatched shapes.
    """
    if min_k < 1:
        raise ValueError(f"min_k must be >= 1, got {min_k}")
    logits = _match_size(logits, target)
    pixel_loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    k = min(min_k, pixel_loss.shape[1])
    if k == pixel_loss.shape[1]:
        return pixel_loss.mean()
    top = pixel_loss.topk(k + 1, dim=1).values  # sorted descending; position k decides the branch
    above = pixel_loss > threshold
    mean_above = (pixel_loss * above).sum(1) / above.sum(1).clamp(min=1)
    per_image = torch.where(top[:, k] > threshold, mean_above, top[:, :k].mean(1))
    return per_image.mean()


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (weighted mean with ``class_weights``); 0 if none is labelled.

    Shape:
        - logits: ``(N, C, H, W)``; target: ``(N, H, W)`` int64; class_weights: ``(C,)``.
    """
    logits = _match_size(logits, target)
    if class_weights is not None and class_weights.numel() != logits.shape[1]:
        raise ValueError(
            f"loss.class_weights has {class_weights.numel()} entries but the logits have {logits.shape[1]} classes"
        )
    if not (target != ignore_index).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive instead of returning NaN
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index)


class BootstrappedCrossEntropy(nn.Module):
    """Module form of :func:`bootstrapped_cross_entropy`."""

    def __init__(self, min_k: int = 4096, threshold: float = 0.3, ignore_index: int = 255) -> None:
        super().__init__()
        if min_k < 1:
            raise ValueError(f"loss.min_k must be >= 1, got {min_k}")
        self.min_k, self.threshold, self.ignore_index = min_k, threshold, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bootstrapped_cross_entropy(logits, target, self.min_k, self.threshold, self.ignore_index)


class CrossEntropy(nn.Module):
    """Module form of :func:`cross_entropy`; the class weights are a buffer, so ``.to(device)`` moves them."""

    def __init__(self, class_weights: Sequence[float] | None = None, ignore_index: int = 255) -> None:
        super().__init__()
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        if weights is not None and (weights.dim() != 1 or (weights < 0).any()):
            raise ValueError(f"loss.class_weights must be a list of non-negative numbers, got {list(class_weights)}")
        self.register_buffer("class_weights", weights)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.class_weights, self.ignore_index)


def build_loss(cfg: Any, num_classes: int | None = None) -> nn.Module:
    """Build the loss named by ``cfg.name``.

    Args:
        cfg: a :class:`segmentation.config.LossConfig`.
        num_classes: when given, ``class_weights`` must have this many entries.

    Returns:
        A module called as ``loss(logits, target)``.

    Raises:
        ValueError: unknown name (lists the valid ones), ``class_weights`` with ``bootstrapped_ce`` or of the
            wrong length, ``min_k < 1``.
    """
    if cfg.name not in LOSSES:
        raise ValueError(f"Unknown loss '{cfg.name}' (loss.name); available: {list(LOSSES)}")
    weights = cfg.class_weights
    if weights is not None and num_classes is not None and len(weights) != num_classes:
        raise ValueError(f"loss.class_weights has {len(weights)} entries, model.num_classes is {num_classes}")
    if cfg.name == "ce":
        return CrossEntropy(weights, cfg.ignore_index)
    if weights is not None:
        raise ValueError("loss.class_weights is only used by loss.name=ce; remove it or set loss.name=ce")
    return BootstrappedCrossEntropy(cfg.min_k, cfg.threshold, cfg.ignore_index)
