"""An image's size (and EXIF orientation) read from its PNG or JPEG header, without decoding a pixel.

Annotation files declare the size of the image they label, and readers allocate masks of that size; serving checks
what a request will cost. Reading the few header bytes first keeps a wrong or hostile declaration from costing
gigabytes. Other formats are decoded with OpenCV, which is bounded by the real image (OpenCV refuses images above
2^30 pixels), not by any declared value.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from segmentation.data.samples import read_image

# OpenCV refuses to decode larger images (its CV_IO_MAX_IMAGE_WIDTH/HEIGHT/PIXELS defaults), so a larger declared
# size can never match a readable image.
MAX_SIDE = 1 << 20
MAX_PIXELS = 1 << 30
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks or segments read before the pixel data. Real files have tens; a crafted one could have millions of
# 4-byte segments, and walking them would cost seconds of Python per image.
_MAX_SEGMENTS = 1000
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Header segments before a JPEG's frame header are at most 64 KiB each; files whose header does not fit in this
# many leading bytes are refused as malformed rather than read whole.
_MAX_HEADER_BYTES = 4 << 20


class ImageHeader(NamedTuple):
    """A PNG/JPEG header: the stored size and the EXIF orientation (1-8; 5-8 swap height and width)."""

    height: int
    width: int
    orientation: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` as displayed, orientation applied."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


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


def read_image_header(path: str | Path) -> ImageHeader | None:
    """The header of the PNG or JPEG image at ``path`` (stored size and EXIF orientation); None for other formats.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, or its PNG/JPEG header is cut short or malformed; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open("rb") as file:
        data = file.read(1 << 16)
        if not data:
            raise ValueError(f"{path}: file is empty (0 bytes)")
        if not data.startswith((_PNG_SIGNATURE, b"\xff\xd8")):
            return None
        header = read_header(data)
        if header is None:  # the frame header may sit behind large metadata segments
            data += file.read(_MAX_HEADER_BYTES - len(data))
            header = read_header(data)
    kind = "PNG without an IHDR header chunk" if data.startswith(_PNG_SIGNATURE) else "JPEG without a frame header"
    if header is None or 0 in (header.height, header.width):
        raise ValueError(f"{path}: not a readable image ({kind} giving its size)")
    return header


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the image at ``path`` as :func:`~segmentation.data.samples.read_image` returns it:
    from the header for PNG and JPEG, EXIF orientation applied (as OpenCV does when decoding, and as annotation tools
    show and declare the image), else by decoding it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, or its PNG/JPEG header is cut short or malformed; the message names it.
    """
    header = read_image_header(path)
    if header is None:
        height, width = read_image(Path(path)).shape[:2]
        return height, width
    return header.shape
