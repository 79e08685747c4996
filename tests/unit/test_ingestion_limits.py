"""Declared image sizes are checked against the real image header before anything of that size is allocated.

Peak memory is measured in a fresh interpreter per case, so a refusal is compared with a valid input of the same
kind under the same imports, not with an absolute number only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import segmentation
from segmentation.data.image_header import read_image_size

PACKAGE_ROOT = Path(segmentation.__file__).resolve().parents[1]  # the checkout under test, also for the children
MARGIN_MB = 50


def peak_memory_mb(tmp_path: Path, cases: dict[str, str]) -> dict[str, tuple[float, str]]:
    """Run each case's code in its own interpreter, all at once; return ``{case: (peak RSS in MB, last line)}``.

    The code prints one outcome line (``ACCEPTED`` or ``REFUSED <message>``). The peak is the child's own ``VmHWM``
    (high-water mark of its address space). Not ``ru_maxrss``: Linux carries the parent's high-water mark over the
    spawn (``vfork`` + ``exec``) into the child's ``ru_maxrss``, and so into the parent's ``RUSAGE_CHILDREN``: after
    one large test, every child would report the pytest process's peak.
    """
    footer = (
        "import re\nstatus = open('/proc/self/status').read()\n"
        "print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code) + footer],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, code in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: child failed:\n{err[-3000:]}"
        lines = out.strip().splitlines()
        assert lines[-1].startswith("PEAK_KB "), out
        results[name] = (int(lines[-1].split()[1]) / 1024, lines[-2])
    return results


def refused_within_valid_memory(tmp_path: Path, child: str, valid: Path, bad: Path, what: str) -> str:
    """Run ``child`` on ``valid`` and on ``bad``; check the valid input is accepted and the bad one costs no more
    memory than it (within :data:`MARGIN_MB`); return the bad one's outcome line."""
    peaks = peak_memory_mb(tmp_path, {"valid": child.format(raw=str(valid)), "refused": child.format(raw=str(bad))})
    print(f"{what} peak RSS: valid {peaks['valid'][0]:.0f} MB, refused {peaks['refused'][0]:.0f} MB")
    assert peaks["refused"][0] < peaks["valid"][0] + MARGIN_MB
    assert peaks["valid"][1] == "ACCEPTED"
    return peaks["refused"][1]


def write_cityscapes(root: Path, declared: tuple[int, int]) -> Path:
    """A one-image Cityscapes train tree: a 64 x 128 PNG and polygons declaring ``declared`` (H, W)."""
    (root / "leftImg8bit/train/aa").mkdir(parents=True)
    (root / "gtFine/train/aa").mkdir(parents=True)
    cv2.imwrite(str(root / "leftImg8bit/train/aa/aa_000000_000001_leftImg8bit.png"), np.zeros((64, 128, 3), np.uint8))
    car = {"label": "car", "polygon": [[0, 0], [20, 0], [20, 20]]}
    polygons = {"imgHeight": declared[0], "imgWidth": declared[1], "objects": [car]}
    (root / "gtFine/train/aa/aa_000000_000001_gtFine_polygons.json").write_text(json.dumps(polygons))
    return root


CITYSCAPES_CHILD = """
from segmentation.data.cityscapes import iter_cityscapes
try:
    for sample in iter_cityscapes({raw!r}):
        sample.build_mask()
    print("ACCEPTED")
except ValueError as exc:
    print("REFUSED", exc)
"""


def test_cityscapes_declared_size_refused_with_little_memory(tmp_path):
    valid = write_cityscapes(tmp_path / "valid", (64, 128))
    # 20000 x 20000 for a 128 x 64 image: the label image, then its train ids, took ~0.8 GB before the mismatch
    # was noticed.
    bad = write_cityscapes(tmp_path / "bad", (20000, 20000))
    refused = refused_within_valid_memory(tmp_path, CITYSCAPES_CHILD, valid, bad, "cityscapes")
    assert (
        refused.startswith("REFUSED ")
        and "declared imgWidth x imgHeight = 20000x20000" in refused
        and "polygons.json" in refused
    )


def zero_png(height: int, width: int) -> bytes:
    """An 8-bit greyscale PNG of zeros, built row by row: a 16000 x 16000 one is ~250 kB on disk."""
    deflate = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    chunks = [(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        for kind, data in chunks
    )


def write_cityscapes_label_ids(root: Path, label_size: tuple[int, int]) -> Path:
    """A one-image Cityscapes train tree: a 64 x 128 PNG and a labelIds PNG of ``label_size`` (H, W)."""
    (root / "leftImg8bit/train/aa").mkdir(parents=True)
    (root / "gtFine/train/aa").mkdir(parents=True)
    cv2.imwrite(str(root / "leftImg8bit/train/aa/aa_000000_000001_leftImg8bit.png"), np.zeros((64, 128, 3), np.uint8))
    (root / "gtFine/train/aa/aa_000000_000001_gtFine_labelIds.png").write_bytes(zero_png(*label_size))
    return root


def test_cityscapes_label_ids_size_refused_with_little_memory(tmp_path):
    valid = write_cityscapes_label_ids(tmp_path / "valid", (64, 128))
    # A 250 kB labelIds PNG of 16000 x 16000 beside a 128 x 64 image: decoded (256 MB), then mapped to train ids
    # (another 256 MB), before preprocess compared it with the image.
    bad = write_cityscapes_label_ids(tmp_path / "bad", (16000, 16000))
    refused = refused_within_valid_memory(tmp_path, CITYSCAPES_CHILD, valid, bad, "cityscapes labelIds")
    assert refused.startswith("REFUSED ") and (
        "labelIds.png: label image is 16000x16000 (W x H, from its header) but " in refused
    )


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


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDX" + bytes(20), "PNG without an IHDR"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG without an IHDR"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG without a frame header"),
        (b"\xff\xd8\xff\xda\x00\x08" + bytes(8), "JPEG without a frame header"),
        (b"\xff\xd8\x00\x00", "JPEG without a frame header"),
    ],
)
def test_unreadable_headers_name_the_file(tmp_path, data, message):
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"broken\.png: .*{message}"):
        read_image_size(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_size(tmp_path / "missing.png")


def write_cvat(root: Path, declared: int, runs: str) -> Path:
    """A CVAT export of one black 8 x 8 PNG declared ``declared`` x ``declared``, with one mask over that box."""
    (root / "cvat").mkdir(parents=True)
    (root / "images").mkdir()
    cv2.imwrite(str(root / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    labels = "<labels><label><name>car</name></label></labels>"
    (root / "cvat" / "annotations.xml").write_text(
        f'<?xml version="1.0"?><annotations><version>1.1</version><meta><task><name>t</name>{labels}</task></meta>'
        f'<image id="0" name="a.png" width="{declared}" height="{declared}"><mask label="car" rle="{runs}" left="0" '
        f'top="0" width="{declared}" height="{declared}"/></image></annotations>'
    )
    return root


CVAT_CHILD = """
from segmentation.data.cvat import read_cvat
try:
    for sample in read_cvat({raw!r}, val_fraction=0.0)[1]:
        sample.build_mask()
    print("ACCEPTED")
except ValueError as exc:
    print("REFUSED", exc)
"""


def test_cvat_declared_size_refused_with_little_memory(tmp_path):
    valid = write_cvat(tmp_path / "valid", 8, "0, 64")
    # A 40-byte RLE declaring a 32768 x 32768 image and mask on an 8 x 8 PNG: the mask, then the decoded runs,
    # took ~2 GiB before the mismatch with the image was noticed.
    bad = write_cvat(tmp_path / "bad", 32768, f"0, {32768 * 32768}")
    refused = refused_within_valid_memory(tmp_path, CVAT_CHILD, valid, bad, "cvat")
    assert (
        refused.startswith("REFUSED ")
        and "annotations.xml: image 'a.png': declared width x height = 32768x32768 but" in refused
        and "a.png is 8x8" in refused
    )


def test_annotation_files_above_their_size_limit_are_refused_before_they_are_read(tmp_path):
    """A 300 MB CVAT XML (parsed, it would hold ~4 GB) and a 100 MB polygons JSON, made sparse (no disk used):
    refused from their size, naming the file, before a byte is parsed."""
    from segmentation.data.cityscapes import MAX_POLYGONS_BYTES, iter_cityscapes
    from segmentation.data.cvat import read_cvat
    from segmentation.data.cvat_xml import MAX_XML_BYTES

    cvat = write_cvat(tmp_path / "cvat", 8, "0, 64")
    (xml,) = (cvat / "cvat").glob("*.xml")
    with xml.open("r+b") as fh:
        fh.truncate(MAX_XML_BYTES + 1)
    with pytest.raises(ValueError, match=rf"{xml.name}: {MAX_XML_BYTES + 1} bytes, above the {MAX_XML_BYTES}"):
        read_cvat(cvat, val_fraction=0.0)
    city = write_cityscapes(tmp_path / "city", (64, 128))
    (polygons,) = city.rglob("*_polygons.json")
    with polygons.open("r+b") as fh:
        fh.truncate(MAX_POLYGONS_BYTES + 1)
    with pytest.raises(ValueError, match=rf"{polygons.name}: {MAX_POLYGONS_BYTES + 1} bytes, above the"):
        for sample in iter_cityscapes(city):
            sample.build_mask()
