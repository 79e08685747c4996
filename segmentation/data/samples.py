"""What a dataset reader hands to preprocessing, and the checked image/mask reads every reader shares.

A reader (Cityscapes, CVAT, synthetic) yields :class:`RawSample` records. Masks are built lazily so that a
dataset of thousands of frames never sits in memory at once. Reads fail loudly: a corrupt, truncated or empty
file raises an error naming it instead of turning into a grey image or an all-ignore mask.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segmentation.data.classes import IGNORE_INDEX

# A download or copy cut short loses the end of the file. OpenCV decodes a truncated JPEG into a half-grey picture
# with only a warning, so the decoder alone is not enough: a PNG must end with its IEND chunk, and a JPEG must reach
# its end-of-image marker (see jpeg_is_complete).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TRAILER = b"IEND\xaeB`\x82"
# A JPEG marker: 0xFF and a code. In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart
# marker D0-D7, neither of which ends the data; 0xFF 0xFF is fill before a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = {0x01, 0xD8}  # TEM and SOI carry no length field
# Real JPEGs have tens of segments and scans; the bound keeps a crafted file from costing seconds of Python.
_MAX_JPEG_SEGMENTS = 10_000


@dataclass(frozen=True)
class RawSample:
    """One image of a source dataset before preprocessing.

    ``key`` is the sample's relative output path without extension (e.g. ``val/frankfurt/frankfurt_000000_000294``);
    it is unique within a dataset. ``load_image`` returns the BGR uint8 image; ``source`` is the file it came from
    (copied or linked as is), or ``None`` when the image is generated. ``build_mask`` returns the ``H x W`` uint8
    train-id mask (255 = ignore); ``labeled=False`` marks an image listed without labels (Cityscapes ``test``).
    """

    key: str
    split: str
    load_image: Callable[[], np.ndarray]
    build_mask: Callable[[], np.ndarray]
    source: Path | None = None
    subset: str = ""
    city: str = ""
    labeled: bool = True


def read_image(path: Path) -> np.ndarray:
    """Read an image with OpenCV as BGR uint8, rejecting empty, corrupt and truncated files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, cannot be decoded or is truncated; the message names the file.
    """
    data = read_complete_bytes(path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image (corrupt file or unsupported format)")
    return image


def read_label_png(path: Path) -> np.ndarray:
    """Read a single-channel 8-bit label image (label ids or train ids) without any conversion.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty, corrupt, truncated, or not a single-channel 8-bit image.
    """
    data = read_complete_bytes(path)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"{path}: not a readable label image (corrupt file or unsupported format)")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(
            f"{path}: a label image must be single-channel 8-bit, found shape {mask.shape} dtype {mask.dtype}"
        )
    return mask


def jpeg_is_complete(data: bytes) -> bool:
    """Whether JPEG ``data`` holds a whole image: its marker segments, from SOI through the scans, reach an
    end-of-image marker (EOI, FF D9) after the first start of scan (SOS).

    Segments are skipped by their length, so the EOI of an EXIF thumbnail (inside APP1) does not count, and the
    entropy-coded data after each SOS is searched for the next marker. Bytes after the EOI (phones append trailers
    and motion-photo videos) are allowed.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    position, scanned = 2, False
    for _ in range(_MAX_JPEG_SEGMENTS):
        found = _JPEG_MARKER.search(data, position)
        if found is None:
            return False
        position, marker = found.start(), data[found.start() + 1]
        if marker == 0xD9:
            return scanned
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if position + 4 > len(data):
            return False
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        scanned = scanned or marker == 0xDA
    return False


def read_complete_bytes(path: Path) -> bytes:
    """The bytes of an image file, refused when empty or when a PNG or JPEG is cut short (checked by content).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is empty or truncated; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: file is empty (0 bytes)")
    # Checked by content, whatever the file is named. PNG writers may pad after IEND, so look for the chunk near the
    # end rather than at the last byte only.
    if data.startswith(_PNG_SIGNATURE) and _PNG_TRAILER not in data[-64:]:
        raise ValueError(f"{path}: truncated PNG file (its IEND end chunk is missing)")
    if data.startswith(b"\xff\xd8") and not jpeg_is_complete(data):
        raise ValueError(
            f"{path}: truncated JPEG file (no end-of-image marker FF D9 after its image data; a complete JPEG may "
            "carry other data after that marker)"
        )
    return data


def check_mask(
    mask: np.ndarray,
    num_classes: int,
    name: str | Path,
    image_shape: tuple[int, ...] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Check a train-id mask: ``H x W`` uint8, values in ``[0, num_classes) ∪ {ignore_index}``, image-sized.

    Raises:
        ValueError: naming ``name``, the offending values or sizes, and what is allowed.
    """
    if mask.ndim != 2:
        raise ValueError(f"{name}: mask must be H x W, found shape {mask.shape}")
    if image_shape is not None and mask.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} (W x H) but its image is "
            f"{image_shape[1]}x{image_shape[0]}; masks must have the image's size"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise ValueError(
            f"{name}: label values {bad.tolist()[:10]} are outside [0, {num_classes}) and not the ignore "
            f"index {ignore_index}"
        )


def seeded_split(keys: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign ``train``/``val`` to ``keys`` reproducibly: the same keys, fraction and seed give the same split.

    At least one sample goes to each side when there are two or more samples and ``0 < val_fraction < 1``.

    Raises:
        ValueError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(keys)
    num_val = round(len(ordered) * val_fraction)
    if val_fraction > 0 and len(ordered) >= 2:
        num_val = min(max(num_val, 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    val = {ordered[i] for i in order[:num_val]}
    return {key: "val" if key in val else "train" for key in ordered}


def check_near_image(points: np.ndarray, height: int, width: int, where: str) -> None:
    """Refuse vertices (``N x 2``, x then y) further than one image side outside a ``width x height`` image.

    Annotators place vertices on or just beside the border. Far-away ones are refused: OpenCV's fill time grows with
    the polygon's extent (seconds at 10^9 px), and rounding beyond int32 would wrap around.

    Raises:
        ValueError: naming ``where``, the first such point and the allowed range.
    """
    margin = max(height, width)
    x, y = points[:, 0], points[:, 1]
    inside = (x >= -margin) & (x <= width + margin) & (y >= -margin) & (y <= height + margin)
    if not inside.all():
        px, py = points[~inside][0]
        raise ValueError(
            f"{where}: point [{px:g}, {py:g}] lies outside the {width}x{height} (W x H) image by more than "
            f"{margin} px; coordinates must be within [-{margin}, {width + margin}] x [-{margin}, {height + margin}]"
        )
