"""PNG and JPEG bytes: the size and EXIF orientation from the header without decoding a pixel, and the pixels as
displayed.

Serving checks what a request will cost from headers alone, so the size it checks must be the size it then
decodes. OpenCV applies the EXIF orientation while decoding (a phone's portrait photo is stored landscape with
orientation 6), so the header's stored size and the decoded shape differ for orientations 5-8. Here the pixels are
decoded as stored (``IMREAD_IGNORE_ORIENTATION``) and turned by the orientation this module read itself: the
header check and the decoded image cannot disagree.
"""

from __future__ import annotations

import cv2
import numpy as np

from segmentation.data.image_header import ImageHeader, exif_orientation, read_header
from segmentation.models import MIN_INPUT_SIDE

__all__ = ["ImageHeader", "decode_oriented", "exif_orientation", "image_size", "padded_pixels", "read_header"]

_ORIENT = {  # EXIF orientation -> the transform from stored to displayed pixels
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.transpose(cv2.rotate(a, cv2.ROTATE_180)),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def padded_pixels(header: ImageHeader) -> int:
    """Pixels the network computes for an image: each side padded up to the model's minimum."""
    return max(header.height, MIN_INPUT_SIDE) * max(header.width, MIN_INPUT_SIDE)


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of PNG or JPEG data as displayed (EXIF orientation applied); None for other data."""
    header = read_header(data)
    return None if header is None else header.shape


def decode_oriented(data: bytes, header: ImageHeader) -> np.ndarray | None:
    """The ``H x W x 3`` uint8 BGR pixels of PNG/JPEG ``data`` as displayed (``header.shape``); None when the data
    is corrupt, truncated, or its pixels disagree with ``header``."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.shape[:2] != (header.height, header.width):
        return None
    return _ORIENT[header.orientation](image) if header.orientation in _ORIENT else image
