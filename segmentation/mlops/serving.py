"""The serving contract: one MLflow pyfunc that turns base64 images into base64 masks, for every backend.

Request: a DataFrame with a string column ``image`` holding a base64 PNG or JPEG of any size (MLflow builds it
from the ``dataframe_split``, ``dataframe_records``, ``instances`` and ``inputs`` JSON forms alike).
Response, one row per image: ``mask`` (base64 PNG of class ids at the input size), ``height``, ``width`` and,
with params ``{"colorize": true}``, ``colorized`` (base64 RGB PNG in the class colours).

The same class serves a PyTorch package (``weights.pt``) and an ONNX package (``model.onnx``); which one it is
comes from the package's ``model.json``. Bad input raises ``MlflowException.invalid_parameter_value``, which the
scoring server answers with a 400 carrying only the message (any other exception would add a stack trace).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from segmentation.data.classes import colorize
from segmentation.inference.predictor import DEFAULT_BACKEND, load_predictor

IMAGE_COLUMN = "image"
# 4096 x 4096: four times a Cityscapes frame. Logits alone take 76 bytes per pixel, so a limit of tens of
# megapixels would let one request take several GB. Override per deployment with SEGMENTATION_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_PIXELS_ENV = "SEGMENTATION_MAX_PIXELS"
# Base64 image data one request may carry: one 4096 x 4096 PNG of pure noise takes 67 MB. MLflow's scoring server
# has already read and parsed the whole body when this is checked (it offers no body limit; see docs/serving.md),
# so it bounds the decoding and inference work of a request, not the upload: cap that in a proxy in front.
DEFAULT_MAX_REQUEST_BYTES = 100 * 2**20
MAX_REQUEST_BYTES_ENV = "SEGMENTATION_MAX_REQUEST_BYTES"
BACKEND_ENV = "SEGMENTATION_INFERENCE_BACKEND"  # auto | eager | channels_last | onnxruntime (PyTorch packages)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def encode_image(image: np.ndarray) -> str:
    """Encode an ``H x W`` or ``H x W x 3`` (BGR) uint8 array as a base64 PNG string."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise ValueError(f"could not encode an array of shape {image.shape} and dtype {image.dtype} as PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` read from a PNG or JPEG header without decoding the pixels; None for other data."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
            continue
        if marker in _JPEG_SOF and i + 9 <= len(data):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_image(text: Any, max_pixels: int = DEFAULT_MAX_PIXELS, row: int = 0) -> np.ndarray:
    """Decode one base64 PNG/JPEG into an ``H x W x 3`` uint8 BGR image, checking its size before decoding.

    Args:
        text: the base64 string (a ``data:image/...;base64,`` prefix is accepted).
        max_pixels: largest ``height * width`` accepted; checked on the header, so a decompression bomb is
            refused before any pixel is decoded.
        row: the row number, named in error messages.

    Raises:
        MlflowException: INVALID_PARAMETER_VALUE (HTTP 400) when the value is not a base64 string, not a
            PNG/JPEG, larger than ``max_pixels`` or corrupt.
    """
    where = f"row {row}, column '{IMAGE_COLUMN}'"
    if not isinstance(text, str):
        raise _bad_request(f"{where}: expected a base64-encoded PNG or JPEG string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad_request(f"{where}: not valid base64; expected a base64-encoded PNG or JPEG file") from None
    size = image_size(data)
    if size is None:
        raise _bad_request(
            f"{where}: not a PNG or JPEG image ({len(data)} bytes decoded from base64, "
            f"starting with {data[:8]!r}); expected a base64-encoded PNG or JPEG file"
        )
    height, width = size
    if height * width > max_pixels:
        raise _bad_request(
            f"{where}: image is {width}x{height} = {height * width} pixels, more than the limit of "
            f"{max_pixels} pixels; send a smaller image"
        )
    if height == 0 or width == 0:
        raise _bad_request(f"{where}: image header says {width}x{height}; expected a non-empty image")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[:2] != (height, width):
        raise _bad_request(f"{where}: the PNG/JPEG data is corrupt or truncated and could not be decoded")
    return image


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The pyfunc behind every served segmentation model; see the module docstring for the contract."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config or {}
        self.setup(
            context.artifacts["package"],
            config.get("max_pixels", DEFAULT_MAX_PIXELS),
            config.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
            config.get("backend", DEFAULT_BACKEND),
        )

    def setup(
        self,
        package: str | Path,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        backend: str = DEFAULT_BACKEND,
    ) -> SegmentationModel:
        """Load a package directly (tests, benchmarks). ``SEGMENTATION_MAX_PIXELS``,
        ``SEGMENTATION_MAX_REQUEST_BYTES`` and ``SEGMENTATION_INFERENCE_BACKEND`` in the environment override
        ``max_pixels``, ``max_request_bytes`` and ``backend`` (a PyTorch package's Predictor backend)."""
        self.predictor, self.classes = load_predictor(package, os.environ.get(BACKEND_ENV, backend))
        self.max_pixels = int(os.environ.get(MAX_PIXELS_ENV, max_pixels))
        self.max_request_bytes = int(os.environ.get(MAX_REQUEST_BYTES_ENV, max_request_bytes))
        return self

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise _bad_request(
                f"expected a column '{IMAGE_COLUMN}' of base64-encoded PNG/JPEG strings, found columns {found}"
            )
        want_color = str((params or {}).get("colorize", False)).lower() in ("true", "1")
        texts = model_input[IMAGE_COLUMN].tolist()
        size = sum(len(text) for text in texts if isinstance(text, str))
        if size > self.max_request_bytes:  # checked before any image is decoded
            raise _bad_request(
                f"the request carries {size} bytes of base64 image data in {len(texts)} row(s), "
                f"more than the limit of {self.max_request_bytes} bytes; send fewer or smaller "
                f"images per request ({MAX_REQUEST_BYTES_ENV} sets the limit)"
            )
        rows = []
        for i, text in enumerate(texts):
            mask = self.predictor.predict_mask(decode_image(text, self.max_pixels, row=i))
            row = {"mask": encode_image(mask), "height": mask.shape[0], "width": mask.shape[1]}
            if want_color:
                row["colorized"] = encode_image(colorize(mask, self.classes)[..., ::-1])  # RGB -> BGR for cv2
            rows.append(row)
        columns = ["mask", "height", "width"] + (["colorized"] if want_color else [])
        return pd.DataFrame(rows, columns=columns)
