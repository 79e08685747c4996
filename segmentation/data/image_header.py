"""An image's size read from its PNG or JPEG header, without decoding a pixel.

Annotation files declare the size of the image they label, and readers allocate masks of that size. Comparing the
declared size with the header first keeps a wrong or hostile declaration from costing gigabytes: only the few
header bytes are read, whatever the file's size. Other formats are decoded with OpenCV, which is bounded by the
real image (OpenCV refuses images above 2^30 pixels), not by any declared value.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from segmentation.data.samples import read_image

# OpenCV refuses to decode larger images (its CV_IO_MAX_IMAGE_WIDTH/HEIGHT/PIXELS defaults), so a larger declared
# size can never match a readable image.
MAX_SIDE = 1 << 20
MAX_PIXELS = 1 << 30
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def _jpeg_size(file: BinaryIO) -> tuple[int, int] | None:
    """``(height, width)`` from the first start-of-frame segment; ``file`` is positioned after the SOI marker."""
    while True:
        byte = file.read(1)
        if byte != b"\xff":
            return None
        marker = file.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = file.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(file.read(2), "big")
        if length < 2:
            return None
        if code in _JPEG_SOF:
            frame = file.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
        file.seek(length - 2, 1)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image at ``path``: from the header for PNG and JPEG, else by decoding it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, or its PNG/JPEG header is cut short or malformed; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open("rb") as file:
        start = file.read(24)
        if not start:
            raise ValueError(f"{path}: file is empty (0 bytes)")
        if start.startswith(_PNG_SIGNATURE):
            if len(start) < 24 or start[12:16] != b"IHDR":
                raise ValueError(f"{path}: not a readable image (PNG without an IHDR header chunk)")
            return int.from_bytes(start[20:24], "big"), int.from_bytes(start[16:20], "big")
        if start.startswith(b"\xff\xd8"):
            file.seek(2)
            size = _jpeg_size(file)
            if size is None or 0 in size:
                raise ValueError(f"{path}: not a readable image (JPEG without a frame header giving its size)")
            return size
    height, width = read_image(path).shape[:2]
    return height, width
