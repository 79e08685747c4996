"""How the predict step reads its input files: the header and pixel limit before decoding, truncated files refused,
one bad file among many skipped with its reason (a stub predictor stands in for the network)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from segmentation.data.classes import ClassInfo
from segmentation.inference import files
from segmentation.inference.files import predict_images
from segmentation.mlops.serving_requests import LIMIT_ENV, Limits

CLASSES = ClassInfo(("a", "b"), ((0, 0, 0), (255, 255, 255)))


class StubPredictor:
    """Records the shape of each image it is handed and predicts class 0 everywhere."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def predict_mask(self, image: np.ndarray, **_: object) -> np.ndarray:
        self.seen.append(image.shape)
        return np.zeros(image.shape[:2], np.uint8)


def _noise(height: int = 96, width: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def _png_of_zeros(height: int, width: int) -> bytes:
    """An RGB PNG of zeros made without holding its pixels: a few hundred KB that decode to ``3 * height * width``."""
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * height, 1)
    chunks = [b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0), b"IDAT" + rows, b"IEND"]
    body = b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture
def decodes(monkeypatch):
    """The sizes OpenCV is asked to decode, whichever OpenCV call reads the file."""
    seen: list[str] = []
    imdecode, imread = cv2.imdecode, cv2.imread

    def spy_decode(buf, flags):
        seen.append("imdecode")
        return imdecode(buf, flags)

    def spy_read(path, flags=cv2.IMREAD_COLOR):
        seen.append(f"imread {path}")
        return imread(path, flags)

    monkeypatch.setattr(cv2, "imdecode", spy_decode)
    monkeypatch.setattr(cv2, "imread", spy_read)
    return seen


def test_truncated_jpeg_is_skipped_with_its_reason_and_the_others_predicted(tmp_path, caplog):
    """OpenCV decodes a JPEG cut short into a picture whose lost rows are grey, with nothing but a console warning."""
    data = _jpeg(_noise())
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "whole.jpg").write_bytes(data)
    stub = StubPredictor()
    inputs = sorted(tmp_path.glob("*.jpg"))
    with caplog.at_level("WARNING"):
        report = predict_images(stub, CLASSES, inputs, tmp_path, tmp_path / "out")
    assert list(report.skipped) == [tmp_path / "cut.jpg"]
    assert "truncated JPEG" in report.skipped[tmp_path / "cut.jpg"]
    assert [p.name for p in report.outputs["mask"]] == ["whole.png"] and stub.seen == [(96, 80, 3)]
    assert "cut.jpg: truncated JPEG" in caplog.text and "skipped 1 unreadable" in caplog.text


def test_png_over_the_pixel_limit_is_refused_from_its_header_before_decoding(tmp_path, decodes):
    """A 300 KB PNG that decodes to 4100 x 4100 x 3 = 50 MB of pixels (12000 x 12000 would be 432 MB): refused by
    the limit serving applies, and no OpenCV decode ever sees it."""
    (tmp_path / "bomb.png").write_bytes(_png_of_zeros(4100, 4100))
    (tmp_path / "small.png").write_bytes(cv2.imencode(".png", _noise())[1].tobytes())
    stub = StubPredictor()
    report = predict_images(stub, CLASSES, sorted(tmp_path.glob("*.png")), tmp_path, tmp_path / "out")
    assert report.skipped == {
        tmp_path / "bomb.png": f"{tmp_path / 'bomb.png'}: image is 4100x4100 = 16810000 pixels, more than the limit "
        "of 16777216 pixels; shrink or tile it, or raise SEGMENTATION_MAX_PIXELS (the limit serving and "
        "batch_predict apply too)"
    }
    assert stub.seen == [(96, 80, 3)] and decodes == ["imdecode"]  # small.png's only


def test_padded_size_counts_and_other_formats_are_checked_once_decoded(tmp_path):
    """As in serving, a side below the network's 64 px is counted padded; a BMP (no header reader) is held to the
    same limit once OpenCV has decoded it, before the network runs."""
    cv2.imwrite(str(tmp_path / "thin.png"), _noise(10, 200))  # padded to 64 x 200 = 12800 pixels
    cv2.imwrite(str(tmp_path / "wide.bmp"), _noise(64, 200))
    with pytest.raises(ValueError, match=r"thin\.png: image is 200x10 = 2000 pixels \(12800 once padded.*12799"):
        files.read_input_image(tmp_path / "thin.png", max_pixels=12799)
    assert files.read_input_image(tmp_path / "thin.png", max_pixels=12800).shape == (10, 200, 3)
    with pytest.raises(ValueError, match=r"wide\.bmp: image is 200x64 = 12800 pixels, more than the limit of 12799"):
        files.read_input_image(tmp_path / "wide.bmp", max_pixels=12799)


def test_file_larger_than_any_image_within_the_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "padded.png"
    path.write_bytes(cv2.imencode(".png", _noise(8, 8))[1].tobytes())
    with path.open("r+b") as file:
        file.truncate(17 << 20)  # sparse: 17 MiB of zeros after IEND
    with pytest.raises(ValueError, match=r"padded\.png: 17825792 bytes, more than an image of at most 4096 pixels"):
        files.read_input_image(path, max_pixels=64 * 64)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    tiff = b"MM" + struct.pack(">HIH", 42, 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_complete_jpegs_are_read_as_displayed_trailer_and_orientation_included(tmp_path):
    """What must still pass: bytes after the end marker (phones append motion-photo videos) and EXIF orientation 6,
    whose displayed size (the header's, checked against the decoded one) swaps height and width."""
    data = _jpeg(_noise(40, 100))
    (tmp_path / "trailer.jpg").write_bytes(data + b"MotionPhoto_Data" + bytes(1000))
    (tmp_path / "portrait.jpg").write_bytes(_with_exif_orientation(data, 6))
    assert files.read_input_image(tmp_path / "trailer.jpg").shape == (40, 100, 3)
    assert files.read_input_image(tmp_path / "portrait.jpg").shape == (100, 40, 3)


def test_the_default_limit_is_servings():
    """The inference layer may not import the serving module; the predict step passes serving's configured value."""
    assert files.DEFAULT_MAX_PIXELS == Limits().max_pixels and files.MAX_PIXELS_ENV == LIMIT_ENV["max_pixels"]
