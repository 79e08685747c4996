"""Declared image sizes are checked against the real image header before anything of that size is allocated."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segmentation.data.image_header import read_image_size


@pytest.mark.parametrize("size", [(1, 1), (37, 5), (64, 128), (2, 70000)])
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_header_size_equals_decoded_size(tmp_path, size, ext):
    if ext == ".jpg" and size[1] > 65500:
        size = (size[0], 65500)  # libjpeg's limit
    path = tmp_path / f"x{ext}"
    cv2.imwrite(str(path), np.zeros((*size, 3), np.uint8))
    assert read_image_size(path) == size == cv2.imread(str(path)).shape[:2]


def test_jpeg_size_after_metadata_segments(tmp_path):
    # Progressive JPEG with a 60 kB APP segment (as EXIF/ICC data would be) before the frame header.
    ok, buf = cv2.imencode(".jpg", np.zeros((33, 47, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = buf.tobytes()
    app = b"\xff\xe2" + (60000 + 2).to_bytes(2, "big") + bytes(60000)
    path = tmp_path / "meta.jpg"
    path.write_bytes(data[:2] + app + data[2:])
    assert read_image_size(path) == (33, 47) == cv2.imread(str(path)).shape[:2]


def test_other_formats_fall_back_to_decoding(tmp_path):
    path = tmp_path / "x.bmp"
    cv2.imwrite(str(path), np.zeros((9, 13, 3), np.uint8))
    assert read_image_size(path) == (9, 13)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX" + bytes(20), "PNG without an IHDR"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG without an IHDR"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG without a frame header"),
    (b"\xff\xd8\xff\xda\x00\x08" + bytes(8), "JPEG without a frame header"),
    (b"\xff\xd8\x00\x00", "JPEG without a frame header"),
])
def test_unreadable_headers_name_the_file(tmp_path, data, message):
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"broken\.png: .*{message}"):
        read_image_size(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_size(tmp_path / "missing.png")
