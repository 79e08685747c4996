"""Faults in files the data readers take in: JPEGs complete or cut short, and hand-edited class tables."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from segmentation.data import samples
from segmentation.data.classes import ClassInfo
from segmentation.data.samples import read_image


def _jpeg(progressive: bool = False, size: tuple[int, int] = (24, 32)) -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()


def _with_exif_thumbnail(data: bytes) -> bytes:
    """``data`` with an APP1 segment holding a complete thumbnail JPEG (its own SOI ... EOI), as cameras write."""
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x00" + _jpeg(size=(8, 8))
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


TRAILERS = {
    "samsung": b"\x00" * 16 + b"SEFH" + b"\x01" * 200 + b"SEFT",
    "motion_photo": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 400,  # an MP4 appended after the image
    "second_jpeg": _jpeg(size=(8, 8)),
    "zero_padding": bytes(100),
}


@pytest.mark.parametrize("trailer", sorted(TRAILERS))
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("name", ["a.jpg", "a.JPEG", "misnamed.png"])
def test_complete_jpeg_with_data_after_its_end_is_read(tmp_path, trailer, progressive, name):
    # Only the last 64 bytes were searched for the end marker: phones' trailers made valid photos "truncated".
    path = tmp_path / name
    path.write_bytes(_with_exif_thumbnail(_jpeg(progressive)) + TRAILERS[trailer])
    assert read_image(path).shape == (24, 32, 3)


def _cut_points(data: bytes) -> dict[str, int]:
    sos = data.index(b"\xff\xda", data.index(b"\xff\xe1") + 4 + int.from_bytes(data[4:6], "big") - 2)
    return {
        "before_scan": sos,
        "after_scan_header": sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big"),
        "inside_scan": (sos + len(data)) // 2,
        "without_end_marker": len(data) - 2,
    }


@pytest.mark.parametrize("cut", ["before_scan", "after_scan_header", "inside_scan", "without_end_marker"])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_cut_short_is_refused(tmp_path, cut, progressive):
    # The thumbnail inside APP1 ends with FF D9 too: only an end marker after the main image's scans counts.
    data = _with_exif_thumbnail(_jpeg(progressive))
    assert samples.jpeg_is_complete(data)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: _cut_points(data)[cut]])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: truncated JPEG file"):
        read_image(path)


def test_jpeg_segment_walk_is_bounded():
    # A crafted header of many tiny segments is refused after a bounded walk, not read for seconds.
    data = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 200_000 + _jpeg()[2:]
    assert not samples.jpeg_is_complete(data)
    assert samples.jpeg_is_complete(b"\xff\xd8" + b"\xff\xfe\x00\x02" * 100 + _jpeg()[2:])


CLASS_TABLES = {
    "short_row": ("id,name,r,g,b\n0,road,1,2,3\n1,car\n255,ignore,0,0,0\n", r"line 3: expected 5 fields .*found 2"),
    "long_row": ("id,name,r,g,b\n0,road,1,2,3,9\n", r"line 2: expected 5 fields .*found 6"),
    "id_not_integer": (
        "id,name,r,g,b\n0,road,1,2,3\nx,car,1,2,3\n",
        r"line 3: id must be an integer in \[0, 255\], found 'x'",
    ),
    "id_beyond_uint8": (
        "id,name,r,g,b\n0,road,1,2,3\n300,car,1,2,3\n",
        r"line 3: id must be an integer in \[0, 255\]",
    ),
    "colour_300": ("id,name,r,g,b\n0,road,300,2,3\n", r"line 2: r must be an integer in \[0, 255\], found '300'"),
    "colour_negative": ("id,name,r,g,b\n0,road,1,-2,3\n", r"line 2: g must be an integer in \[0, 255\], found '-2'"),
    "colour_fraction": ("id,name,r,g,b\n0,road,1,2,3.5\n", r"line 2: b must be an integer in \[0, 255\], found '3.5'"),
    "empty_name": ("id,name,r,g,b\n0, ,1,2,3\n", r"line 2: name is empty"),
}


@pytest.mark.parametrize("case", sorted(CLASS_TABLES))
def test_damaged_class_table_names_file_line_and_what_is_allowed(tmp_path, case):
    text, message = CLASS_TABLES[case]
    path = tmp_path / "classes.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}, {message}"):
        ClassInfo.read_csv(path)


def test_class_table_round_trip_and_blank_lines(tmp_path):
    path = tmp_path / "classes.csv"
    ClassInfo.cityscapes().write_csv(path)
    assert ClassInfo.read_csv(path) == ClassInfo.cityscapes()
    path.write_text('id,name,r,g,b\n\n1," car, parked",4,5,6\n0,road,1,2,3\n255,ignore,0,0,0\n')
    assert ClassInfo.read_csv(path) == ClassInfo(("road", " car, parked"), ((1, 2, 3), (4, 5, 6)))
