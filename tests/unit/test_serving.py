"""The serving pyfunc in-process: masks at the input size, colours, every bad input a 400-style MlflowException."""

from __future__ import annotations

import base64
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_bn_model
from mlflow.exceptions import MlflowException

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo, colorize
from segmentation.inference.image_bytes import image_size
from segmentation.inference.onnx import export_onnx
from segmentation.mlops.serving import SegmentationModel
from segmentation.mlops.serving_requests import decode_image, encode_image
from segmentation.models import FCHarDNet
from segmentation.models.package import save_model_package
from segmentation.models.preprocessing import to_input_tensor

CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))


def _random_model() -> FCHarDNet:
    return random_bn_model(CLASSES.num_classes)


@pytest.fixture(scope="module")
def model() -> FCHarDNet:
    return _random_model()


@pytest.fixture(scope="module", params=["pytorch", "onnx"])
def served(request, model, tmp_path_factory) -> SegmentationModel:
    package = tmp_path_factory.mktemp(request.param)
    save_model_package(model, CLASSES, ModelConfig(num_classes=CLASSES.num_classes), package)
    if request.param == "onnx":  # an ONNX package: model.onnx + model.json with backend onnx
        export_onnx(model, package / "model.onnx")
        (package / "weights.pt").unlink()
        meta = (package / "model.json").read_text().replace('"backend": "pytorch"', '"backend": "onnx"')
        (package / "model.json").write_text(meta)
    return SegmentationModel().setup(package)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> str:
    return encode_image(array)


def _decode(text: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (96, 160), (30, 40), (1, 1)])
def test_mask_has_the_input_size_and_class_ids(served, size):
    out = served.predict(None, pd.DataFrame({"image": [_png(_image(*size))]}))
    assert list(out.columns) == ["mask", "height", "width"]
    mask = _decode(out["mask"][0])
    assert mask.shape == size and mask.dtype == np.uint8
    assert (out["height"][0], out["width"][0]) == size
    assert mask.max() < CLASSES.num_classes


def test_mask_equals_the_argmax_of_the_eager_model(served, model):
    image = _image(70, 90, seed=3)
    with torch.no_grad():
        expected = model(to_input_tensor(image)).argmax(1)[0].numpy()
    mask = _decode(served.predict(None, pd.DataFrame({"image": [_png(image)]}))["mask"][0])
    assert (mask == expected).mean() >= 0.999


def test_several_rows_of_different_sizes_keep_their_order(served):
    images = [_image(64, 80, 1), _image(100, 70, 2), _image(66, 66, 3)]
    out = served.predict(None, pd.DataFrame({"image": [_png(i) for i in images]}))
    assert [(h, w) for h, w in zip(out["height"], out["width"], strict=True)] == [(64, 80), (100, 70), (66, 66)]
    single = served.predict(None, pd.DataFrame({"image": [_png(images[1])]}))
    assert out["mask"][1] == single["mask"][0]


def test_colorize_returns_the_mask_in_class_colours(served):
    out = served.predict(None, pd.DataFrame({"image": [_png(_image(64, 96))]}), params={"colorize": True})
    mask = _decode(out["mask"][0])
    color_bgr = _decode(out["colorized"][0])
    assert color_bgr.shape == (64, 96, 3)
    np.testing.assert_array_equal(color_bgr[..., ::-1], colorize(mask, CLASSES))
    assert "colorized" not in served.predict(None, pd.DataFrame({"image": [_png(_image(64, 64))]}), {}).columns


def test_jpeg_grayscale_and_rgba_inputs_are_accepted(served):
    image = _image(72, 88)
    jpeg = base64.b64encode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()).decode()
    gray = _png(image[..., 0])
    rgba = _png(np.dstack([image, np.full((72, 88), 255, np.uint8)]))
    out = served.predict(None, pd.DataFrame({"image": [jpeg, gray, "data:image/png;base64," + rgba]}))
    assert all(_decode(m).shape == (72, 88) for m in out["mask"])


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_image_size_reads_the_header(ext):
    data = cv2.imencode(ext, _image(37, 53))[1].tobytes()
    assert image_size(data) == (37, 53)
    assert image_size(b"GIF89a" + data) is None


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width x height`` followed by a few bytes of pixel data: a bomb's shape."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    body = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + len(ihdr).to_bytes(4, "big")
        + chunk
        + zlib.crc32(chunk).to_bytes(4, "big")
        + len(body).to_bytes(4, "big")
        + b"IDAT"
        + body
        + zlib.crc32(b"IDAT" + body).to_bytes(4, "big")
    )


BAD_INPUTS = {
    "not base64": ("###not base64###", "not valid base64"),
    "not an image": (base64.b64encode(b"hello, this is text").decode(), "not a PNG or JPEG"),
    "a number": (7, "expected a base64-encoded PNG or JPEG string, got int"),
    "bomb": (base64.b64encode(_png_header_only(50_000, 50_000)).decode(), "more than the limit"),
    "truncated png": (_png(_image(64, 64))[:200], "corrupt or truncated"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_images_raise_invalid_parameter_value(served, name):
    value, message = BAD_INPUTS[name]
    with pytest.raises(MlflowException, match=message) as info:
        served.predict(None, pd.DataFrame({"image": [_png(_image(64, 64)), value]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "row 1" in info.value.message


def test_missing_column_names_the_expected_column(served):
    with pytest.raises(MlflowException, match="expected a column 'image'.*found columns \\['img'\\]") as info:
        served.predict(None, pd.DataFrame({"img": [_png(_image(64, 64))]}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_pixel_limit_comes_from_the_environment(model, tmp_path, monkeypatch):
    package = save_model_package(model, CLASSES, ModelConfig(num_classes=3), tmp_path / "pkg")
    monkeypatch.setenv("SEGMENTATION_MAX_PIXELS", str(64 * 64))
    served = SegmentationModel().setup(package)
    assert served.predict(None, pd.DataFrame({"image": [_png(_image(64, 64))]}))["height"][0] == 64
    with pytest.raises(MlflowException, match="65x64 = 4160 pixels, more than the limit of 4096"):
        served.predict(None, pd.DataFrame({"image": [_png(_image(64, 65))]}))


def test_decode_image_returns_bgr_as_encoded():
    image = _image(20, 30)
    np.testing.assert_array_equal(decode_image(_png(image)), image)
