"""The serving pyfunc's limits, in-process: what a request may cost is checked on headers before any pixel is
decoded (padded area per image and per request, rows), a deadline stops the work between images, EXIF-rotated
photos are decoded as displayed, and every failure is a one-line ServingError that MLflow cannot rewrite."""

from __future__ import annotations

import base64
import struct
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.inference.image_bytes import exif_orientation, image_size, read_header
from segmentation.mlops.serving import SegmentationModel
from segmentation.mlops.serving_requests import ServingError, decode_image, encode_image, load_limits
from segmentation.models import FCHarDNet
from segmentation.models.package import save_model_package

CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = FCHarDNet(num_classes=CLASSES.num_classes).eval()
    return save_model_package(model, CLASSES, ModelConfig(num_classes=3), tmp_path_factory.mktemp("pkg") / "pkg")


@pytest.fixture
def serve(package, monkeypatch):
    """``serve(**env)``: the pyfunc loaded with ``SEGMENTATION_<KEY>=value`` set, on the eager backend."""

    def load(**env: object) -> SegmentationModel:
        monkeypatch.setenv("SEGMENTATION_INFERENCE_BACKEND", "eager")
        for key, value in env.items():
            monkeypatch.setenv(f"SEGMENTATION_{key.upper()}", str(value))
        return SegmentationModel().setup(package)

    return load


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _request(*texts: str) -> pd.DataFrame:
    return pd.DataFrame({"image": list(texts)})


def _png_header_only(width: int, height: int) -> str:
    """A PNG announcing ``width x height`` whose pixel data is a few zero bytes: it cannot be decoded."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = b"IDAT" + zlib.compress(b"\x00" * 100)
    chunks = b"".join((len(c) - 4).to_bytes(4, "big") + c + zlib.crc32(c).to_bytes(4, "big") for c in (ihdr, idat))
    return _b64(b"\x89PNG\r\n\x1a\n" + chunks)


def _tiff_orientation(orientation: int, order: bytes = b"MM") -> bytes:
    """EXIF TIFF data with one IFD0 entry: Orientation (0x0112), type SHORT, count 1."""
    e = ">" if order == b"MM" else "<"
    return order + struct.pack(f"{e}HIH", 42, 8, 1) + struct.pack(f"{e}HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)


def _jpeg_with_orientation(image: np.ndarray, orientation: int, order: bytes = b"MM") -> bytes:
    """A JPEG of ``image`` as stored, with an APP1 Exif segment right after SOI saying how to display it."""
    data = cv2.imencode(".jpg", image)[1].tobytes()
    payload = b"Exif\x00\x00" + _tiff_orientation(orientation, order)
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _png_with_orientation(image: np.ndarray, orientation: int) -> bytes:
    data = cv2.imencode(".png", image)[1].tobytes()
    body = b"eXIf" + _tiff_orientation(orientation)
    return data[:33] + (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big") + data[33:]


# 1. Limits on what the network computes, for the whole request, from headers only.


def test_the_pixel_limit_counts_the_padding_of_thin_images(serve):
    served = serve(max_pixels=64 * 500)
    assert served.predict(None, _request(encode_image(_image(1, 500))))["width"][0] == 500  # 64 x 500 computed
    with pytest.raises(ServingError, match=r"image is 600x1, padded to 600x64 = 38400 pixels for the network, more"):
        served.predict(None, _request(encode_image(_image(1, 600))))  # 600 pixels, but 64 x 600 computed


def test_a_flat_million_pixel_strip_is_refused_from_its_header(serve):
    # 1 x 1,000,000: under the default 4096^2 limit as stored, 64,000,000 pixels as computed. Undecodable data
    # shows the refusal comes from the header.
    with pytest.raises(ServingError, match="1000000x1, padded to 1000000x64 = 64000000 pixels") as info:
        serve().predict(None, _request(_png_header_only(1_000_000, 1)))
    assert info.value.get_http_status_code() == 400


def test_the_request_pixel_limit_sums_padded_images_before_decoding_any(serve):
    served = serve(max_request_pixels=3 * 64 * 64)
    assert len(served.predict(None, _request(*[encode_image(_image(1, 1, seed=i)) for i in range(3)]))) == 3
    undecodable = [_png_header_only(64, 64)] * 4  # refused on the total before any row is found corrupt
    with pytest.raises(ServingError, match="4 image.* take 16384 pixels padded .* more than the limit of 12288"):
        served.predict(None, _request(*undecodable))


def test_the_row_limit_is_checked_before_any_row(serve):
    served = serve(max_rows=3)
    assert len(served.predict(None, _request(*[encode_image(_image(2, 2))] * 3))) == 3
    with pytest.raises(ServingError, match="4 rows, more than the limit of 3 images per request") as info:
        served.predict(None, _request(*["%% not even base64 %%"] * 4))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_limits_come_from_model_config_and_the_environment_wins(package, monkeypatch):
    monkeypatch.setenv("SEGMENTATION_INFERENCE_BACKEND", "eager")
    served = SegmentationModel().setup(package, {"max_rows": 1, "max_pixels": 4096})
    assert (served.limits.max_rows, served.limits.max_pixels) == (1, 4096)
    monkeypatch.setenv("SEGMENTATION_MAX_ROWS", "5")
    assert load_limits({"max_rows": 1}).max_rows == 5
    for env, value in [("SEGMENTATION_MAX_ROWS", "abc"), ("SEGMENTATION_REQUEST_DEADLINE_S", "-1")]:
        monkeypatch.setenv(env, value)
        with pytest.raises(ValueError, match=f"{env}='{value}': expected a positive"):
            load_limits()
        monkeypatch.delenv(env)
    with pytest.raises(ValueError, match="max_pixels=1.5: expected a positive int"):
        load_limits({"max_pixels": 1.5})


def test_the_deadline_defaults_to_mlflows_request_timeout(monkeypatch):
    monkeypatch.delenv("SEGMENTATION_REQUEST_DEADLINE_S", raising=False)
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "7")  # what `mlflow models serve -t 7` sets
    assert load_limits().deadline_s == 7.0
    assert load_limits({"deadline_s": 2.5}).deadline_s == 2.5


# 2. EXIF orientation.


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("order", [b"MM", b"II"])
def test_jpeg_exif_orientation_decodes_as_opencv_displays_it(orientation, order):
    data = _jpeg_with_orientation(_image(20, 30), orientation, order)
    assert exif_orientation(_tiff_orientation(orientation, order)) == orientation
    displayed = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies the orientation
    assert image_size(data) == displayed.shape[:2] == ((30, 20) if orientation >= 5 else (20, 30))
    np.testing.assert_array_equal(decode_image(_b64(data)), displayed)


def test_png_exif_orientation_is_applied_too():
    data = _png_with_orientation(_image(20, 30), 6)
    assert read_header(data) == (20, 30, 6)
    np.testing.assert_array_equal(decode_image(_b64(data)), cv2.rotate(_image(20, 30), cv2.ROTATE_90_CLOCKWISE))


def test_a_portrait_phone_photo_gets_a_portrait_mask(serve):
    stored = _image(64, 96, seed=4)  # a phone stores the sensor's landscape frame and EXIF orientation 6
    served = serve()
    out = served.predict(None, _request(_b64(_jpeg_with_orientation(stored, 6))))
    assert (out["height"][0], out["width"][0]) == (96, 64)
    upright = cv2.imdecode(np.frombuffer(_jpeg_with_orientation(stored, 6), np.uint8), cv2.IMREAD_COLOR)
    assert out["mask"][0] == served.predict(None, _request(encode_image(upright)))["mask"][0]


def test_the_size_check_names_the_displayed_size(serve):
    data = _jpeg_with_orientation(_image(64, 80), 8)  # stored 80 wide, 64 high; displayed 64 wide, 80 high
    with pytest.raises(ServingError, match="image is 64x80 = 5120 pixels, more than the limit of 5000"):
        serve(max_pixels=5000).predict(None, _request(_b64(data)))


# 3. One-line failures MLflow cannot rewrite.


def test_mlflows_rewrite_of_the_message_is_ignored():
    # MLflow's scoring server does `e.message = f"Failed to predict data '{data}'. \nError: {e.message}"`.
    error = ServingError("row 0: not valid base64")
    error.message = f"Failed to predict data '{'A' * 10_000}'. \nError: {error.message}"
    assert error.message == "row 0: not valid base64"
    assert len(error.serialize_as_json()) < 200 and "AAAA" not in error.serialize_as_json()


def test_an_unexpected_failure_is_a_one_line_internal_error(tmp_path):
    # A real ONNX model exported with a fixed 64 x 64 input: onnxruntime raises on any other size.
    save_model_package(FCHarDNet(num_classes=3).eval(), CLASSES, ModelConfig(num_classes=3), tmp_path)
    onnx_file, conv = tmp_path / "model.onnx", torch.nn.Conv2d(3, 3, 1)
    torch.onnx.export(conv, torch.zeros(1, 3, 64, 64), onnx_file, input_names=["image"], dynamo=False)
    (tmp_path / "weights.pt").unlink()
    meta = (tmp_path / "model.json").read_text().replace('"backend": "pytorch"', '"backend": "onnx"')
    (tmp_path / "model.json").write_text(meta)
    served = SegmentationModel().setup(tmp_path)
    assert served.predict(None, _request(encode_image(_image(64, 64))))["height"][0] == 64
    with pytest.raises(MlflowException) as info:
        served.predict(None, _request(encode_image(_image(64, 96))))
    assert isinstance(info.value, ServingError) and info.value.error_code == "INTERNAL_ERROR"
    assert info.value.message.startswith("prediction failed (") and "\n" not in info.value.message
    assert str(tmp_path) not in info.value.serialize_as_json() and "stack_trace" not in info.value.serialize_as_json()


# 4. The compute budget.


def test_the_deadline_stops_the_work_between_images_then_refuses_up_front(serve):
    served = serve(request_deadline_s=0.2)
    request = _request(*[encode_image(np.zeros((512, 512, 3), np.uint8))] * 40)  # 10 Mpx: seconds on a CPU
    with pytest.raises(ServingError, match=r"stopped after \d+ of 40 images .* compute budget of 0.2 s") as info:
        served.predict(None, request)
    assert info.value.error_code == "RESOURCE_EXHAUSTED" and info.value.get_http_status_code() == 429
    rate = served.seconds_per_pixel
    assert rate > 0  # measured on the images it did compute
    with pytest.raises(ServingError, match=r"refused before computing: the request's 10485760 padded pixels need"):
        served.predict(None, request)
    assert served.seconds_per_pixel == rate  # nothing was computed
    assert served.predict(None, _request(encode_image(_image(64, 64))))["height"][0] == 64


@pytest.mark.parametrize("form", ["compact", "mime lines", "data url", "spaces around padding"])
def test_base64_with_or_without_whitespace_decodes_to_the_same_image(form):
    image = _image(21, 34)  # 21 x 34 x 3: a PNG whose base64 needs padding
    compact = encode_image(image)
    assert compact.endswith("=")
    text = {
        "compact": compact,
        "mime lines": base64.encodebytes(base64.b64decode(compact)).decode(),  # 76-character lines, "\n" ends
        "data url": "data:image/png;base64," + compact,
        "spaces around padding": compact.rstrip("=") + " " + " ".join("=" * compact.count("=")) + "\n",
    }[form]
    np.testing.assert_array_equal(decode_image(text), image)


@pytest.mark.parametrize("text", ["abc*", "abcde", "ab=c", "abc===", "AAA\u00a0"])
def test_text_outside_the_base64_alphabet_or_length_is_refused(text):
    with pytest.raises(ServingError, match="not valid base64"):
        decode_image(text)
