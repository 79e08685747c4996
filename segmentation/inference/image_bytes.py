"""PNG and JPEG bytes: the size and EXIF orientation from the header without decoding a pixel, and the pixels as
displayed.

Serving checks what a request will cost from headers alone, so the size it checks must be the size it then
decodes. OpenCV applies the EXIF orientation while decoding (a phone's portrait photo is stored landscape with
orientation 6), so the header's stored size and the decoded shape differ for orientations 5-8. Here the pixels are
decoded as stored (``IMREAD_IGNORE_ORIENTATION``) and turned by the orientation this module read itself: the
header check and the decoded image cannot disagree.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from segmentation.models import MIN_INPUT_SIDE


class ImageHeader(NamedTuple):
    """A PNG/JPEG header: the stored size and the EXIF orientation (1-8; 5-8 swap height and width)."""

    height: int
    width: int
    orientation: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` as displayed, orientation applied."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)

    @property
    def padded_pixels(self) -> int:
        """Pixels the network computes: each side padded up to the model's minimum."""
        return max(self.height, MIN_INPUT_SIDE) * max(self.width, MIN_INPUT_SIDE)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks or segments read before the pixel data. Real files have tens; a crafted one could have millions of
# 4-byte segments, and walking them would cost seconds of Python per image.
_MAX_SEGMENTS = 1000
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ORIENT = {  # EXIF orientation -> the transform from stored to displayed pixels
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.transpose(cv2.rotate(a, cv2.ROTATE_180)),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of EXIF TIFF data; 1 (as stored) when absent or invalid."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT, first in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def read_header(data: bytes) -> ImageHeader | None:
    """The header of PNG or JPEG data (the EXIF orientation from a JPEG APP1 or a PNG eXIf chunk before the
    pixel data), without decoding any pixel; None when it is neither or the header is cut off."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        orientation, i = 1, 8
        for _ in range(_MAX_SEGMENTS):
            if i + 8 > len(data) or data[i + 4 : i + 8] in (b"IDAT", b"IEND"):
                break
            length = int.from_bytes(data[i : i + 4], "big")
            if data[i + 4 : i + 8] == b"eXIf":
                orientation = exif_orientation(data[i + 8 : i + 8 + length])
            i += 12 + length
        return ImageHeader(int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), orientation)
    if not data.startswith(b"\xff\xd8"):
        return None
    orientation, i = 1, 2
    for _ in range(_MAX_SEGMENTS):
        if i + 4 > len(data) or data[i] != 0xFF:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
        elif marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            size = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return ImageHeader(*size, orientation)
        elif marker == 0xDA:  # start of scan before any frame header
            return None
        else:
            if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
                orientation = exif_orientation(data[i + 10 : i + 2 + length])
            i += 2 + length
    return None


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
