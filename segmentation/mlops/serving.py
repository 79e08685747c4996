"""The serving contract: one MLflow pyfunc that turns base64 images into base64 masks, for every backend.

Request: a DataFrame with a string column ``image`` holding a base64 PNG or JPEG (MLflow builds it from the
``dataframe_split``, ``dataframe_records``, ``instances`` and ``inputs`` JSON forms alike). Images are decoded with
their EXIF orientation, as a photo viewer shows them.
Response, one row per image: ``mask`` (base64 PNG of class ids at the oriented input size), ``height``, ``width``
and, with params ``{"colorize": true}``, ``colorized`` (base64 RGB PNG in the class colours).

The same class serves a PyTorch package (``weights.pt``) and an ONNX package (``model.onnx``); which one it is
comes from the package's ``model.json``.

Limits (:mod:`segmentation.mlops.serving_requests`) bound the work of a request before any pixel is decoded; a
compute deadline then stops the work between images. Every failure raises a one-line ``ServingError``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_EXHAUSTED

from segmentation.data.classes import colorize
from segmentation.inference.image_bytes import padded_pixels
from segmentation.inference.predictor import DEFAULT_BACKEND, load_predictor
from segmentation.mlops.serving_requests import (
    IMAGE_COLUMN,
    LIMIT_ENV,
    ServingError,
    decode_pixels,
    encode_image,
    inspect_image,
    load_limits,
)

logger = logging.getLogger(__name__)

# The up-front estimate of a request's time must never exceed it, or a request that would fit is refused. Per-image
# overhead makes small images slower per pixel, and a cold start or a busy neighbour slows any image: the rate is
# measured on images of 512 x 512 or more only, its best value kept, and the estimate takes twice that speed.
_RATE_MIN_PIXELS = 512 * 512
_RATE_MARGIN = 2.0

BACKEND_ENV = "SEGMENTATION_INFERENCE_BACKEND"  # auto | eager | channels_last | onnxruntime (PyTorch packages)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The pyfunc behind every served segmentation model; see the module docstring for the contract."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.setup(context.artifacts["package"], context.model_config)

    def setup(self, package: str | Path, config: Mapping[str, Any] | None = None) -> SegmentationModel:
        """Load a package directly (tests, benchmarks). ``config`` takes the model_config keys: the fields of
        :class:`Limits` and ``backend`` (a PyTorch package's Predictor backend); the environment variables of
        :data:`LIMIT_ENV` and ``SEGMENTATION_INFERENCE_BACKEND`` override them."""
        config = config or {}
        self.limits = load_limits(config)
        backend = os.environ.get(BACKEND_ENV) or config.get("backend", DEFAULT_BACKEND)
        self.predictor, self.classes = load_predictor(package, backend)
        self.seconds_per_pixel = 0.0  # the fastest rate measured on an image of _RATE_MIN_PIXELS or more; 0: none yet
        return self

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params)
        except ServingError:
            raise
        except MemoryError:
            message = "the server ran out of memory for this request; send fewer or smaller images per request"
            raise ServingError(message, RESOURCE_EXHAUSTED) from None
        except Exception as exc:  # the traceback goes to the server's log, never to the client
            logger.exception("prediction failed")
            message = f"prediction failed ({type(exc).__name__}); the server's log has the details"
            raise ServingError(message, INTERNAL_ERROR) from None

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None) -> pd.DataFrame:
        started, limits = time.monotonic(), self.limits
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            if isinstance(model_input, pd.DataFrame):
                found = f"columns {[str(column)[:40] for column in model_input.columns[:10]]}"
            else:
                found = type(model_input).__name__
            raise ServingError(f"expected a column '{IMAGE_COLUMN}' of base64-encoded PNG/JPEG strings, found {found}")
        rows = len(model_input)
        if rows > limits.max_rows:
            raise ServingError(
                f"the request has {rows} rows, more than the limit of {limits.max_rows} images per request; send "
                f"fewer images per request ({LIMIT_ENV['max_rows']} sets the limit)"
            )
        texts = model_input[IMAGE_COLUMN].tolist()
        size = sum(len(text) for text in texts if isinstance(text, str))
        if size > limits.max_request_bytes:
            raise ServingError(
                f"the request carries {size} bytes of base64 image data in {rows} row(s), more than the limit of "
                f"{limits.max_request_bytes} bytes; send fewer or smaller images per request "
                f"({LIMIT_ENV['max_request_bytes']} sets the limit)"
            )
        headers = [inspect_image(text, limits.max_pixels, row=i) for i, text in enumerate(texts)]
        remaining = sum(padded_pixels(header) for header in headers)
        if remaining > limits.max_request_pixels:
            raise ServingError(
                f"the request's {rows} image(s) take {remaining} pixels padded for the network, more than the limit "
                f"of {limits.max_request_pixels} pixels per request; send fewer or smaller images per request "
                f"({LIMIT_ENV['max_request_pixels']} sets the limit)"
            )
        want_color = str((params or {}).get("colorize", False)).lower() in ("true", "1")
        out = []
        for i, (text, header) in enumerate(zip(texts, headers, strict=True)):
            self._check_budget(started, remaining, i, rows)
            row_started = time.monotonic()
            mask = self.predictor.predict_mask(decode_pixels(text, header, i))
            row = {"mask": encode_image(mask), "height": mask.shape[0], "width": mask.shape[1]}
            if want_color:
                row["colorized"] = encode_image(colorize(mask, self.classes)[..., ::-1])  # RGB -> BGR for cv2
            out.append(row)
            rate = (time.monotonic() - row_started) / padded_pixels(header)
            if padded_pixels(header) >= _RATE_MIN_PIXELS:
                self.seconds_per_pixel = min(self.seconds_per_pixel or rate, rate)
            remaining -= padded_pixels(header)
        columns = ["mask", "height", "width"] + (["colorized"] if want_color else [])
        return pd.DataFrame(out, columns=columns)

    def _check_budget(self, started: float, remaining: int, done: int, rows: int) -> None:
        """Refuse to start work that cannot end within the deadline: the time spent, plus the remaining padded
        pixels at a lower bound of their cost (0 until an image large enough to measure has been computed)."""
        elapsed, needed = time.monotonic() - started, remaining * self.seconds_per_pixel / _RATE_MARGIN
        if elapsed + needed <= self.limits.deadline_s:
            return
        budget = f"the compute budget of {self.limits.deadline_s:g} s per request ({LIMIT_ENV['deadline_s']} sets it)"
        if done == 0 and needed:
            message = (
                f"refused before computing: the request's {remaining} padded pixels need at least {needed:.1f} s "
                f"(at {_RATE_MARGIN:g}x the fastest rate this server has measured, "
                f"{_RATE_MARGIN * 1e-6 / self.seconds_per_pixel:.2f} Mpx/s), more than {budget}"
            )
        else:
            message = (
                f"stopped after {done} of {rows} images and {elapsed:.1f} s: the remaining {remaining} padded pixels "
                f"need at least {needed:.1f} s more, beyond {budget}"
            )
        raise ServingError(message + "; send fewer or smaller images per request", RESOURCE_EXHAUSTED)
