"""Albumentations pipelines built from the ``augmentation`` config.

Images stay BGR uint8 through the pipeline (the model's input contract, see
:mod:`segmentation.models.preprocessing`); masks are resized with nearest neighbour only and padded with the
ignore index, so a mask never gains a value that is not a class id or 255. Normalisation happens afterwards in
the dataset with :func:`segmentation.models.preprocessing.normalize`, the one definition inference uses too.
"""

from __future__ import annotations

import albumentations as A
import cv2

from segmentation.config import AugmentationConfig
from segmentation.data.classes import IGNORE_INDEX


def build_train_transforms(
    cfg: AugmentationConfig, ignore_index: int = IGNORE_INDEX, seed: int | None = None
) -> A.Compose:
    """Horizontal flip, random scale in ``[scale_min, scale_max]``, pad to the crop, random crop, colour jitter.

    Args:
        cfg: the ``augmentation`` section; ``color_jitter`` 0 disables the jitter.
        ignore_index: value of padded mask pixels (image padding is 0).
        seed: seed of the pipeline's random generators; data-loader workers re-seed their copy.

    Returns:
        An ``A.Compose`` taking ``image=`` (H x W x 3 uint8) and ``mask=`` (H x W uint8) and returning
        ``crop_height x crop_width`` outputs.
    """
    transforms = [
        A.HorizontalFlip(p=cfg.hflip_prob),
        # RandomScale draws a factor in 1 + scale_limit, hence the shift by one.
        A.RandomScale(
            scale_limit=(cfg.scale_min - 1.0, cfg.scale_max - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        ),
        A.PadIfNeeded(
            min_height=cfg.crop_height,
            min_width=cfg.crop_width,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
            position="top_left",
        ),
        A.RandomCrop(height=cfg.crop_height, width=cfg.crop_width),
    ]
    if cfg.color_jitter > 0:
        # Hue is left alone: it would rotate BGR as if it were RGB. Brightness/contrast are channel-order free.
        s = cfg.color_jitter
        transforms.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=0.0, p=0.8))
    return A.Compose(transforms, seed=seed)


def build_val_transforms(cfg: AugmentationConfig) -> A.Compose:
    """Nothing, or a resize to ``val_height x val_width`` (image bilinear, mask nearest) when both are > 0."""
    if cfg.val_height > 0 and cfg.val_width > 0:
        return A.Compose(
            [
                A.Resize(
                    height=cfg.val_height,
                    width=cfg.val_width,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                )
            ]
        )
    return A.Compose([])
