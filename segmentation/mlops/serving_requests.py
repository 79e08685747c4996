"""What a serving request may hold and how its images are read: the limits, the one-line error, base64 PNG/JPEG.

Limits (:class:`Limits`) bound the work of a request before any pixel is decoded: rows, base64 bytes, and the
padded pixels the network computes per image and per request, all read from headers. Every failure raises a
:class:`ServingError`: one line, no stack trace, never the request's data (see that class for why MLflow's own
exceptions would quote the whole input back).
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import cv2
import numpy as np
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from segmentation.inference.image_bytes import ImageHeader, decode_oriented, padded_pixels, read_header
from segmentation.models import MIN_INPUT_SIDE

IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class Limits:
    """What one request may cost. Each comes from ``model_config[<field>]``, overridden by its environment variable.

    Pixels are counted as the network computes them: an image under 64 px on a side is padded up to 64 first.
    """

    # 4096 x 4096: four Cityscapes frames. Logits take 76 bytes per pixel, so tens of megapixels cost several GB.
    max_pixels: int = 4096 * 4096  # per image
    max_request_pixels: int = 4 * 4096 * 4096  # all images of a request: ~10-25 s on 2 CPU cores
    max_rows: int = 256
    # One 4096 x 4096 PNG of noise takes 67 MB of base64. MLflow has parsed the whole body when this is checked.
    max_request_bytes: int = 100 * 2**20
    # Compute budget of a request, checked between images; 0 means MLflow's request timeout (`serve -t`, 60 s).
    deadline_s: float = 0.0


LIMIT_ENV = {
    "max_pixels": "SEGMENTATION_MAX_PIXELS",
    "max_request_pixels": "SEGMENTATION_MAX_REQUEST_PIXELS",
    "max_rows": "SEGMENTATION_MAX_ROWS",
    "max_request_bytes": "SEGMENTATION_MAX_REQUEST_BYTES",
    "deadline_s": "SEGMENTATION_REQUEST_DEADLINE_S",
}


def load_limits(config: Mapping[str, Any] | None = None) -> Limits:
    """:class:`Limits` from a model_config mapping and the environment (which wins); ``ValueError`` names a bad one."""
    limits = Limits()
    for field in fields(Limits):
        env = LIMIT_ENV[field.name]
        source, raw = (env, os.environ[env]) if os.environ.get(env) else (field.name, (config or {}).get(field.name))
        if raw is None:
            continue
        kind = float if field.name == "deadline_s" else int
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            value = -1
        if not (math.isfinite(value) and value > 0) or (kind is int and str(raw).strip() != str(value)):
            raise ValueError(f"serving limit {source}={raw!r}: expected a positive {kind.__name__}")
        limits = replace(limits, **{field.name: value})
    if not limits.deadline_s:
        limits = replace(limits, deadline_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()))
    return limits


class ServingError(MlflowException):
    """A one-line failure whose message reaches the client as written.

    MLflow's scoring server rewrites the message of any MlflowException from ``predict`` into ``Failed to predict
    data '<the whole input>'. Error: <message>``, so a refused 150 MiB request would be answered with 150 MiB, and
    answers any other exception with its stack trace. This class keeps the first message it is given.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def encode_image(image: np.ndarray) -> str:
    """Encode an ``H x W`` or ``H x W x 3`` (BGR) uint8 array as a base64 PNG string."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"could not encode an array of shape {image.shape} and dtype {image.dtype} as PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


_BASE64 = re.compile(r"[A-Za-z0-9+/\s]*(?:=\s*){0,2}", re.ASCII)  # \s: the six whitespace characters counted below
_BASE64_COMPACT = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # the same without whitespace
_DATA_URL = re.compile(r"\s*data:[^,]{0,200},")  # data:image/png;base64,
_HEADER_CHARS = 4 * 2**14  # the base64 characters of the first 48 KiB, where a PNG or JPEG header normally is


def _data_start(text: str) -> int:
    data_url = _DATA_URL.match(text)
    return data_url.end() if data_url else 0


def _base64_span(text: Any, where: str) -> tuple[int, int]:
    """Where the base64 data of ``text`` starts (after a ``data:...;base64,`` prefix) and how many bytes it
    decodes to, checked without copying ``text``."""
    if not isinstance(text, str):
        raise ServingError(f"{where}: expected a base64-encoded PNG or JPEG string, got {type(text).__name__}")
    start = _data_start(text)
    if _BASE64_COMPACT.fullmatch(text, start):  # the usual form: one pass, nothing to count
        chars = len(text) - start
    elif _BASE64.fullmatch(text, start):
        chars = len(text) - start - sum(text.count(space, start) for space in " \t\n\r\v\f")
    else:
        chars = -1
    if chars < 0 or chars % 4:
        raise ServingError(f"{where}: not valid base64; expected a base64-encoded PNG or JPEG file")
    return start, chars // 4 * 3 - text.count("=", max(start, len(text) - 64))


def _b64decode(text: str, start: int, stop: int | None = None) -> bytes:
    chars = "".join(text[start:stop].split())
    return base64.b64decode(chars[: len(chars) // 4 * 4] if stop is not None else chars, validate=True)


def inspect_image(text: Any, max_pixels: int = Limits.max_pixels, row: int = 0) -> ImageHeader:
    """Check one base64 image value without decoding its pixels: base64 alphabet, PNG/JPEG header, size.

    Raises:
        ServingError: INVALID_PARAMETER_VALUE (HTTP 400) naming the row when the value is not a base64 string,
            not a PNG/JPEG, empty, or more than ``max_pixels`` once padded for the network.
    """
    where = f"row {row}, column '{IMAGE_COLUMN}'"
    start, size = _base64_span(text, where)
    data = _b64decode(text, start, start + _HEADER_CHARS)
    header = read_header(data)
    cut = header is None if data.startswith(b"\xff\xd8") else data.startswith(b"\x89PNG") and b"IDAT" not in data
    if cut and len(text) - start > _HEADER_CHARS:  # metadata pushes the JPEG frame header or PNG pixels further
        data = _b64decode(text, start)
        header = read_header(data)
    if header is None:
        raise ServingError(
            f"{where}: not a PNG or JPEG image ({size} bytes decoded from base64, starting with {data[:8]!r}); "
            "expected a base64-encoded PNG or JPEG file"
        )
    (height, width), padded = header.shape, padded_pixels(header)
    if padded > max_pixels:
        size = f"{width}x{height} = {height * width} pixels"
        if padded != height * width:
            size = f"{width}x{height}, padded to {max(width, MIN_INPUT_SIDE)}x{max(height, MIN_INPUT_SIDE)} = "
            size += f"{padded} pixels for the network"
        raise ServingError(
            f"{where}: image is {size}, more than the limit of {max_pixels} pixels; send a smaller image "
            f"({LIMIT_ENV['max_pixels']} sets the limit)"
        )
    if height == 0 or width == 0:
        raise ServingError(f"{where}: image header says {width}x{height}; expected a non-empty image")
    return header


def decode_pixels(text: str, header: ImageHeader, row: int) -> np.ndarray:
    try:
        image = decode_oriented(_b64decode(text, _data_start(text)), header)
    except (binascii.Error, ValueError):
        image = None
    if image is None:
        raise ServingError(
            f"row {row}, column '{IMAGE_COLUMN}': the PNG/JPEG data is corrupt or truncated and could not be decoded"
        )
    return image


def decode_image(text: Any, max_pixels: int = Limits.max_pixels, row: int = 0) -> np.ndarray:
    """Decode one base64 PNG/JPEG into an ``H x W x 3`` uint8 BGR image in its EXIF orientation, checked first by
    :func:`inspect_image`. Raises ServingError (HTTP 400) as that does, and for corrupt or truncated data."""
    return decode_pixels(text, inspect_image(text, max_pixels, row), row)
