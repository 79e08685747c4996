"""CVAT exports: the real project export in tests/data, generated exports with known pixels, and every bad input."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segmentation.data import cvat
from segmentation.data.cvat import read_cvat
from segmentation.data.cvat_shapes import TrackShape, box_corners, decode_rle, shape_at
from segmentation.data.preprocess import run_preprocess

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cvat_sample" / "raw"

LABELS = """<labels>
  <label><name>road</name><color>#804080</color></label>
  <label><name>car</name><color>#00008e</color></label>
  <label><name>person</name></label>
</labels>"""


def make_export(
    root: Path, body: str, images: dict[str, tuple[int, int]], meta: str | None = None, header: str = ""
) -> Path:
    """Write ``root/cvat/annotations.xml`` and black PNG images of the given (height, width)."""
    (root / "cvat").mkdir(parents=True, exist_ok=True)
    meta = meta if meta is not None else f"<meta><task><name>t</name>{LABELS}</task></meta>"
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?>\n{header}<annotations>\n<version>1.1</version>\n{meta}\n'
        f"{body}\n</annotations>\n"
    )
    (root / "cvat" / "annotations.xml").write_text(xml)
    for name, (h, w) in images.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / name), np.zeros((h, w, 3), np.uint8))
    return root


def masks_by_key(raw: Path, **kwargs) -> dict[str, np.ndarray]:
    _, samples = read_cvat(raw, **kwargs)
    return {s.key: s.build_mask() for s in samples}


def test_real_project_export(caplog):
    caplog.set_level(logging.INFO, logger="segmentation.data.cvat")
    classes, samples = read_cvat(SAMPLE)
    assert classes.names == ("background", "label1", "label2")
    # Names repeat across the three subsets: six distinct samples keyed by subset + name.
    assert sorted(s.key for s in samples) == sorted(
        f"{sub}/img{i}" for sub in ("Train", "Validation", "Test") for i in (0, 1)
    )
    assert {s.subset: s.split for s in samples} == {"Train": "train", "Validation": "val", "Test": "test"}
    img0 = next(s for s in samples if s.key == "Train/img0").build_mask()
    assert img0.shape == (8, 8)
    assert (img0[2:5, 0:5] == 1).all() and img0.sum() == 15  # box 0,2 -> 4,4 of label1, edges included
    img1 = next(s for s in samples if s.key == "Test/img1").build_mask()
    assert set(np.unique(img1)) == {0, 1} and 5 <= (img1 == 1).sum() <= 10  # the sliver polygon
    # polyline (img0) and points (img1) carry no area: skipped in every subset and reported.
    assert "'points': 3" in caplog.text and "'polyline': 3" in caplog.text


def test_real_sample_preprocess(tmp_path):
    table = run_preprocess("cvat", SAMPLE, tmp_path / "out")
    df = pd.read_parquet(table)
    assert len(df) == 6 and set(df["split"]) == {"train", "val", "test"}
    mask = cv2.imread(str(tmp_path / "out" / df.loc[0, "mask"]), cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.ndim == 2


def test_z_order_then_document_order(tmp_path):
    # A 20x20 image: a road polygon (z 0) under a car box (z 2), a person mask on top (z 3) although written
    # first, and a second road box with z 2 written after the car, so it covers the car where they overlap.
    rle_rows = np.zeros((4, 4), np.uint8)
    rle_rows[1:3, 1:3] = 1  # a 2x2 square inside a 4x4 box at left=8, top=8 -> pixels (9..10, 9..10)
    runs = [4 + 1, 2, 2, 2, 4 + 1]  # background 5, fg 2, bg 2, fg 2, bg 5 = 16 px
    assert (decode_rle(tuple(runs), 4, 4, "t") == rle_rows.astype(bool)).all()
    body = f"""<image id="0" name="a.png" width="20" height="20">
  <mask label="person" rle="{", ".join(map(str, runs))}" left="8" top="8" width="4" height="4" z_order="3"/>
  <polygon label="road" points="0,0;19,0;19,19;0,19" z_order="0"/>
  <box label="car" xtl="5" ytl="5" xbr="14" ybr="14" z_order="2"/>
  <box label="road" xtl="12" ytl="12" xbr="16" ybr="16" z_order="2"/>
</image>"""
    mask = masks_by_key(make_export(tmp_path, body, {"a.png": (20, 20)}), val_fraction=0.0)["default/a"]
    assert mask[0, 0] == 1 and mask[19, 19] == 1  # road
    assert mask[6, 6] == 2 and mask[11, 6] == 2  # car over road
    assert mask[9, 9] == 3 and mask[10, 10] == 3 and mask[8, 8] == 2  # person mask only where the rle says
    assert mask[13, 13] == 1  # later road box (same z) over the car


def test_rotated_box_and_colours(tmp_path):
    body = """<image id="0" name="r.png" width="21" height="21">
  <box label="car" xtl="4" ytl="9" xbr="16" ybr="11" rotation="90"/>
</image>"""
    raw = make_export(tmp_path, body, {"r.png": (21, 21)})
    classes, samples = read_cvat(raw, val_fraction=0.0)
    mask = samples[0].build_mask()
    # A 12x2 horizontal bar turned 90 degrees about its centre (10, 10) is a vertical bar.
    assert mask[5, 10] == 2 and mask[15, 10] == 2 and mask[10, 5] == 0 and mask[10, 15] == 0
    assert np.allclose(box_corners(0, 0, 2, 2, 90)[0], [2, 0])  # top-left corner moves right: clockwise
    assert classes.colors[:3] == ((0, 0, 0), (128, 64, 128), (0, 0, 142))


def test_video_track_interpolates_and_respects_outside(tmp_path):
    meta = f"""<meta><task><name>v</name><size>8</size><mode>interpolation</mode>
<original_size><width>40</width><height>20</height></original_size>{LABELS}</task></meta>"""
    body = """<track id="0" label="car">
  <box frame="0" outside="0" occluded="0" keyframe="1" xtl="0" ytl="5" xbr="4" ybr="9" z_order="0"/>
  <box frame="4" outside="0" occluded="0" keyframe="1" xtl="20" ytl="5" xbr="24" ybr="9" z_order="0"/>
  <box frame="6" outside="1" occluded="0" keyframe="1" xtl="20" ytl="5" xbr="24" ybr="9" z_order="0"/>
</track>
<track id="1" label="person">
  <polygon frame="2" outside="0" occluded="0" keyframe="1" points="30,10;34,10;34,14;30,14" z_order="1"/>
  <polyline frame="2" outside="0" occluded="0" keyframe="1" points="1,1;2,2" z_order="1"/>
</track>"""
    images = {f"frame_{i:06d}.png": (20, 40) for i in range(8)}
    masks = masks_by_key(make_export(tmp_path, body, images, meta=meta), val_fraction=0.0)
    assert len(masks) == 8
    car = {f: np.argwhere(masks[f"default/frame_{f:06d}"] == 2) for f in range(8)}
    assert car[0][:, 1].min() == 0 and car[4][:, 1].min() == 20
    assert car[2][:, 1].min() == 10 and car[2][:, 1].max() == 14  # halfway between frames 0 and 4
    assert car[5][:, 1].min() == 20  # held until the outside keyframe
    assert car[6].size == 0 and car[7].size == 0  # outside from frame 6 on
    person = {f: (masks[f"default/frame_{f:06d}"] == 3).sum() for f in range(8)}
    assert person[0] == person[1] == 0 and person[2] == 25 and person[7] == 25  # appears at 2, persists


def test_shape_at_interpolates_polygons():
    from segmentation.data.cvat_shapes import Shape

    a = Shape("polygon", "x", points=np.array([[0.0, 0], [4, 0], [4, 4]]))
    b = Shape("polygon", "x", points=np.array([[10.0, 0], [14, 0], [14, 4]]))
    track = [TrackShape(0, False, a), TrackShape(10, False, b)]
    assert np.allclose(shape_at(track, 5).points[:, 0], [5, 9, 9])
    assert shape_at(track, -1) is None


def test_task_export_without_subsets_gets_seeded_split(tmp_path):
    body = "\n".join(f'<image id="{i}" name="im{i}.png" width="8" height="8"/>' for i in range(10))
    raw = make_export(tmp_path, body, {f"im{i}.png": (8, 8) for i in range(10)})
    split_a = {s.key: s.split for s in read_cvat(raw, val_fraction=0.3, seed=1)[1]}
    split_b = {s.key: s.split for s in read_cvat(raw, val_fraction=0.3, seed=1)[1]}
    assert split_a == split_b and sum(v == "val" for v in split_a.values()) == 3


def test_images_under_subset_folder(tmp_path):
    body = '<image id="0" name="x.png" width="8" height="6" subset="Validation"/>'
    raw = make_export(tmp_path, body, {"Validation/x.png": (6, 8)})
    samples = read_cvat(raw)[1]
    assert samples[0].split == "val" and samples[0].source == raw / "images" / "Validation" / "x.png"


BAD_XML = {
    "billion_laughs": ('<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n', "", "unsafe"),
    "external_entity": ('<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n', "", "unsafe"),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_unsafe_xml_refused(tmp_path, case):
    header, body, expected = BAD_XML[case]
    raw = make_export(tmp_path / "raw", body, {}, header=header)
    with pytest.raises(ValueError, match=expected) as info:
        run_preprocess("cvat", raw, tmp_path / "out")
    assert "annotations.xml" in str(info.value)
    assert not (tmp_path / "out" / "split").exists()


def _bad_input(tmp_path: Path, case: str) -> tuple[Path, type, str]:
    raw = tmp_path / "raw"
    ok_image = (
        '<image id="0" name="a.png" width="8" height="8"><box label="car" xtl="1" ytl="1" xbr="3" ybr="3"/></image>'
    )
    if case == "malformed":
        make_export(raw, ok_image.replace("</image>", ""), {"a.png": (8, 8)})
        return raw, ValueError, r"malformed XML at line \d+, column \d+"
    if case == "undeclared_label":
        make_export(raw, ok_image.replace('"car"', '"truck"'), {"a.png": (8, 8)})
        return raw, ValueError, "'truck', which meta does not declare"
    if case == "missing_image":
        make_export(raw, ok_image, {})
        return raw, FileNotFoundError, "missing on disk"
    if case == "traversal":
        make_export(raw, ok_image.replace("a.png", "../../a.png"), {"a.png": (8, 8)})
        return raw, ValueError, "escapes"
    if case == "size_mismatch":
        make_export(raw, ok_image, {"a.png": (8, 9)})
        return raw, ValueError, r"image 'a.png': declared width x height = 8x8 but .*a.png is 9x8 \(W x H"
    if case == "unknown_subset":
        make_export(raw, ok_image.replace('height="8"', 'height="8" subset="holdout"'), {"a.png": (8, 8)})
        return raw, ValueError, "subset 'holdout'"
    make_export(raw, ok_image, {"a.png": (8, 8)})
    image = raw / "images" / "a.png"
    if case == "corrupt_image":
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 + b"IEND\xaeB`\x82")
        return raw, ValueError, "not a readable image"
    if case == "truncated_image":
        image.write_bytes(image.read_bytes()[:-20])
        return raw, ValueError, "truncated PNG"
    if case == "empty_image":
        image.write_bytes(b"")
        return raw, ValueError, "0 bytes"
    if case == "bad_rle":
        make_export(
            raw,
            ok_image.replace(
                '<box label="car" xtl="1" ytl="1" xbr="3" ybr="3"/>',
                '<mask label="car" rle="1, 2" left="0" top="0" width="2" height="2"/>',
            ),
            {"a.png": (8, 8)},
        )
        return raw, ValueError, "rle has runs summing to 3"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "malformed",
        "undeclared_label",
        "missing_image",
        "traversal",
        "size_mismatch",
        "unknown_subset",
        "corrupt_image",
        "truncated_image",
        "empty_image",
        "bad_rle",
    ],
)
def test_bad_input_fails_and_writes_nothing(tmp_path, case):
    raw, error, message = _bad_input(tmp_path, case)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous content")
    with pytest.raises(error, match=message):
        run_preprocess("cvat", raw, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_empty_raw_dir_and_no_xml(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        run_preprocess("cvat", tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no CVAT export found"):
        run_preprocess("cvat", tmp_path / "raw", tmp_path / "out")


def test_copied_sample_matches_shared(shared_data):
    shared = shared_data / "cvat_sample" / "raw"
    for path in sorted(p for p in shared.rglob("*") if p.is_file()):
        assert (SAMPLE / path.relative_to(shared)).read_bytes() == path.read_bytes()


def test_declared_size_checked_against_the_image_header(tmp_path):
    # A 4x4 mask on a 16x16 image declared 8x8 drew onto the declared mask; only preprocess noticed the mismatch.
    body = (
        '<image id="0" name="a.png" width="8" height="8"><mask label="car" rle="0, 16" left="0" top="0" '
        'width="4" height="4"/></image>'
    )
    with pytest.raises(
        ValueError,
        match=r"annotations\.xml: image 'a\.png': declared width x height = 8x8 but "
        r".*a\.png is 16x16 \(W x H, from its header\)",
    ):
        read_cvat(make_export(tmp_path / "img", body, {"a.png": (16, 16)}))
    meta = f"""<meta><task><name>v</name><size>2</size>
<original_size><width>40</width><height>20</height></original_size>{LABELS}</task></meta>"""
    body = '<track id="0" label="car"><box frame="0" outside="0" xtl="0" ytl="0" xbr="4" ybr="4"/></track>'
    images = {"frame_000000.png": (20, 40), "frame_000001.jpg": (20, 41)}
    with pytest.raises(
        ValueError,
        match=r"annotations\.xml: frame 1 \(meta original_size\): declared width x "
        r"height = 40x20 but .*frame_000001\.jpg is 41x20",
    ):
        read_cvat(make_export(tmp_path / "video", body, images, meta=meta))


@pytest.mark.parametrize(
    ("box", "attribute"),
    [
        ('left="6" top="0" width="4" height="2"', "width"),
        ('left="-2" top="0" width="2" height="2"', "left"),
        ('left="0" top="7" width="2" height="2"', "height"),
        ('left="0" top="9" width="0" height="0"', "top"),
    ],
)
def test_mask_box_must_lie_inside_the_image(tmp_path, box, attribute):
    # Boxes partly outside were clipped silently; the runs over them were decoded at whatever size was declared.
    body = f'<image id="0" name="a.png" width="8" height="8"><mask label="car" rle="0, 8" {box}/></image>'
    raw = make_export(tmp_path, body, {"a.png": (8, 8)})
    with pytest.raises(
        ValueError,
        match=rf"annotations\.xml: image 'a\.png': mask 'car': {attribute} must be an "
        r"integer in \[0, \d+\], found '-?\d+' \(the mask box must lie inside the "
        r"8x8 \(W x H\) image\)",
    ):
        read_cvat(raw)


@pytest.mark.parametrize("link", ["image", "subset_folder", "images_folder", "video_frame", "xml"])
def test_symlinks_resolving_outside_raw_dir_are_refused(tmp_path, link):
    # A link to a file outside raw_dir was accepted, and preprocess hard-linked its target into out_dir.
    outside = tmp_path / "outside"
    outside.mkdir()
    cv2.imwrite(str(outside / "a.png"), np.zeros((8, 8, 3), np.uint8))
    raw = tmp_path / "raw"
    body = '<image id="0" name="a.png" width="8" height="8"><box label="car" xtl="1" ytl="1" xbr="3" ybr="3"/></image>'
    if link == "video_frame":
        meta = f"""<meta><task><name>v</name><size>1</size>
<original_size><width>8</width><height>8</height></original_size>{LABELS}</task></meta>"""
        body = '<track id="0" label="car"><box frame="0" outside="0" xtl="0" ytl="0" xbr="4" ybr="4"/></track>'
        make_export(raw, body, {}, meta=meta)
        (raw / "images").mkdir()
        (raw / "images" / "frame_000000.png").symlink_to(outside / "a.png")
        message = r"annotations\.xml: frame 0: .*frame_000000\.png resolves to .*outside/a\.png, outside raw_dir"
    elif link == "image":
        make_export(raw, body, {})
        (raw / "images").mkdir()
        (raw / "images" / "a.png").symlink_to(outside / "a.png")
        message = r"annotations\.xml: image 'a\.png': .*images/a\.png resolves to .*outside/a\.png, outside raw_dir"
    elif link == "subset_folder":
        make_export(raw, body.replace('height="8"', 'height="8" subset="Train"'), {})
        (raw / "images").mkdir()
        (raw / "images" / "Train").symlink_to(outside, target_is_directory=True)
        message = r"annotations\.xml: image 'a\.png': .*/Train/a\.png resolves to .*outside/a\.png, outside raw_dir"
    elif link == "images_folder":
        make_export(raw, body, {})
        (raw / "images").symlink_to(outside, target_is_directory=True)
        message = r"annotations\.xml: image 'a\.png': .*images/a\.png resolves to .*outside/a\.png, outside raw_dir"
    else:
        make_export(outside, body, {})
        (raw / "cvat").mkdir(parents=True)
        (raw / "cvat" / "annotations.xml").symlink_to(outside / "cvat" / "annotations.xml")
        (raw / "images").mkdir()
        cv2.imwrite(str(raw / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
        message = r"raw/cvat/annotations\.xml resolves to .*outside/cvat/annotations\.xml, outside raw_dir"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_preprocess("cvat", raw, out)
    assert not (out / "images").exists()


def test_symlinks_inside_raw_dir_are_followed(tmp_path):
    body = '<image id="0" name="a.png" width="8" height="8"><box label="car" xtl="1" ytl="1" xbr="3" ybr="3"/></image>'
    raw = make_export(tmp_path / "raw", body, {"store/a.png": (8, 8)})
    (raw / "images" / "a.png").symlink_to(raw / "images" / "store" / "a.png")
    df = pd.read_parquet(run_preprocess("cvat", raw, tmp_path / "out", val_fraction=0.0))
    assert list(df["image"]) == ["images/default/a.png"]
    assert (tmp_path / "out" / "images/default/a.png").read_bytes() == (raw / "images/store/a.png").read_bytes()


BOX = '<box label="car" xtl="1" ytl="1" xbr="3" ybr="3"/>'
MALFORMED_VALUES = {
    "box_not_numeric": (
        BOX.replace('xtl="1"', 'xtl="abc"'),
        r"image 'a\.png': box 'car': attribute xtl='abc' must be "
        r"a finite number",
    ),
    "box_missing": (BOX.replace(' ybr="3"', ""), r"image 'a\.png': box 'car': attribute ybr is missing"),
    "ellipse_infinite": (
        '<ellipse label="car" cx="1e400" cy="3" rx="1" ry="1"/>',
        r"image 'a\.png': ellipse 'car': attribute cx='1e400' must be a finite number",
    ),
    "mask_missing_left": (
        '<mask label="car" rle="0, 4" top="0" width="2" height="2"/>',
        r"image 'a\.png': mask 'car': attribute left is missing",
    ),
    "mask_missing_rle": (
        '<mask label="car" left="0" top="0" width="2" height="2"/>',
        r"image 'a\.png': mask 'car': attribute rle is missing",
    ),
    "polygon_missing_points": (
        '<polygon label="car"/>',
        r"image 'a\.png': polygon 'car': attribute points is missing",
    ),
    "shape_without_label": (BOX.replace(' label="car"', ""), r"image 'a\.png': box: attribute label is missing"),
    "image_without_width": ("", r"image 'a\.png': attribute width is missing"),
    "image_without_name": ("", r"<image> element 0 \(id '0'\): attribute name is missing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_VALUES))
def test_malformed_image_values_name_file_element_and_attribute(tmp_path, case):
    shape, message = MALFORMED_VALUES[case]
    image = f'<image id="0" name="a.png" width="8" height="8">{shape}</image>'
    if case == "image_without_width":
        image = image.replace(' width="8"', "")
    elif case == "image_without_name":
        image = image.replace(' name="a.png"', "")
    raw = make_export(tmp_path, image, {"a.png": (8, 8)})
    with pytest.raises(ValueError, match=r"annotations\.xml: " + message):
        read_cvat(raw)


@pytest.mark.parametrize(
    ("track", "message"),
    [
        (
            '<track id="0" label="car"><box outside="0" xtl="0" ytl="0" xbr="4" ybr="4"/></track>',
            r"track '0': box 'car': attribute frame is missing",
        ),
        (
            '<track id="0" label="car"><box frame="0" outside="yes" xtl="0" ytl="0" xbr="4" ybr="4"/></track>',
            r"track '0': box 'car': attribute outside='yes' must be 0 or 1",
        ),
        (
            '<track id="3" label="car"><polygon frame="0" outside="0" points="0,0;4,0;x,4"/></track>',
            r"track '3': polygon 'car': points must be >= 3 finite 'x,y' pairs",
        ),
        (
            '<track id="0"><box frame="0" outside="0" xtl="0" ytl="0" xbr="4" ybr="4"/></track>',
            r"track '0': attribute label is missing",
        ),
        (
            '<track label="car"><box frame="0" outside="0" xtl="0" ytl="0" xbr="4" ybr="4"/></track>',
            r"<track> element 0: attribute id is missing",
        ),
    ],
    ids=["frame_missing", "outside_not_binary", "points_not_numeric", "label_missing", "id_missing"],
)
def test_malformed_track_values_name_file_element_and_attribute(tmp_path, track, message):
    meta = f"""<meta><task><name>v</name><size>1</size>
<original_size><width>8</width><height>8</height></original_size>{LABELS}</task></meta>"""
    raw = make_export(tmp_path, track, {"frame_000000.png": (8, 8)}, meta=meta)
    with pytest.raises(ValueError, match=r"annotations\.xml: " + message):
        read_cvat(raw)


# Reference counts of pixel centres inside the ellipse, by hand: a radius-5 circle holds the 81 lattice points with
# x^2 + y^2 <= 25; for rx=8, ry=3 the rows y = 0, +-1, +-2, +-3 hold 17, 2 x 15, 2 x 11 and 2 x 1 = 71.
@pytest.mark.parametrize(
    ("attrs", "count", "rows", "cols"),
    [
        ('cx="20" cy="20" rx="5" ry="5"', 81, (15, 25), (15, 25)),
        ('cx="20" cy="20" rx="8" ry="3"', 71, (17, 23), (12, 28)),
        ('cx="20" cy="20" rx="8" ry="3" rotation="90"', 71, (12, 28), (17, 23)),
        ('cx="20.00" cy="20.00" rx="5.00" ry="5.00" rotation="0.00"', 81, (15, 25), (15, 25)),  # as CVAT writes them
    ],
)
def test_ellipse_rx_ry_are_radii(tmp_path, attrs, count, rows, cols):
    # CVAT 1.1 writes rx = right - cx and ry = cy - top (cvat-ai/cvat, cvat/apps/dataset_manager/formats/cvat.py):
    # radii, not coordinates. Read as |rx - cx|, a radius-5 circle at (20, 20) labelled ~700 pixels instead of ~80.
    body = f'<image id="0" name="e.png" width="40" height="40"><ellipse label="car" {attrs}/></image>'
    mask = masks_by_key(make_export(tmp_path, body, {"e.png": (40, 40)}), val_fraction=0.0)["default/e"]
    ys, xs = np.nonzero(mask == 2)
    assert len(ys) == count
    assert (ys.min(), ys.max()) == rows and (xs.min(), xs.max()) == cols


@pytest.mark.parametrize(
    ("attrs", "pixels"),
    [
        ('cx="20" cy="20" rx="0" ry="0"', [(20, 20)]),
        ('cx="20.5" cy="20.5" rx="0" ry="0"', []),  # no pixel centre on the point (the whole 2x2 window before)
        ('cx="20" cy="20" rx="0" ry="2"', [(18, 20), (19, 20), (20, 20), (21, 20), (22, 20)]),
        ('cx="20.5" cy="20" rx="0.5" ry="0"', [(20, 20), (20, 21)]),
    ],
)
def test_ellipse_with_a_zero_radius_labels_its_segment(tmp_path, attrs, pixels):
    body = f'<image id="0" name="e.png" width="40" height="40"><ellipse label="car" {attrs}/></image>'
    mask = masks_by_key(make_export(tmp_path, body, {"e.png": (40, 40)}), val_fraction=0.0)["default/e"]
    assert [tuple(p) for p in np.argwhere(mask == 2)] == pixels


def test_ellipse_rotation_is_clockwise(tmp_path):
    # Turned 45 degrees clockwise on screen (y down), the long axis runs from top-left to bottom-right.
    body = (
        '<image id="0" name="e.png" width="40" height="40">'
        '<ellipse label="car" cx="20" cy="20" rx="8" ry="1" rotation="45"/></image>'
    )
    mask = masks_by_key(make_export(tmp_path, body, {"e.png": (40, 40)}), val_fraction=0.0)["default/e"]
    assert mask[24, 24] == 2 and mask[16, 16] == 2 and mask[16, 24] == 0 and mask[24, 16] == 0


def test_ellipse_negative_radius_is_refused(tmp_path):
    body = (
        '<image id="0" name="e.png" width="40" height="40">'
        '<ellipse label="car" cx="20" cy="20" rx="-5" ry="5"/></image>'
    )
    with pytest.raises(
        ValueError,
        match=r"annotations\.xml: image 'e\.png': ellipse 'car': attribute rx='-5' must "
        r"be a radius >= 0",
    ):
        read_cvat(make_export(tmp_path, body, {"e.png": (40, 40)}))


def _jpeg_with_orientation(image: np.ndarray, orientation: int) -> bytes:
    """``image`` as a JPEG whose EXIF (APP1, big-endian TIFF) carries ``orientation``."""
    ifd = (1).to_bytes(2, "big") + bytes.fromhex("0112 0003 00000001") + orientation.to_bytes(2, "big") + bytes(6)
    payload = b"Exif\x00\x00MM\x00\x2a" + (8).to_bytes(4, "big") + ifd
    data = cv2.imencode(".jpg", image)[1].tobytes()
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_exif_rotated_photo_is_checked_at_its_displayed_size(tmp_path, orientation):
    # A portrait phone photo is stored 16 wide x 8 high with orientation 6; CVAT shows and declares it 8 x 16, and
    # OpenCV decodes it 8 x 16. The header check compared the stored 16 x 8 and refused what CVAT wrote.
    body = (
        '<image id="0" name="a.jpg" width="8" height="16"><box label="car" xtl="0" ytl="0" xbr="3" ybr="3"/>'
        '</image><image id="1" name="b.png" width="8" height="8"/>'
    )
    raw = make_export(tmp_path / "raw", body, {"b.png": (8, 8)})
    (raw / "images" / "a.jpg").write_bytes(_jpeg_with_orientation(np.zeros((8, 16, 3), np.uint8), orientation))
    df = pd.read_parquet(run_preprocess("cvat", raw, tmp_path / "out"))
    row = df[df["image"] == "images/default/a.jpg"].iloc[0]
    mask = cv2.imread(str(tmp_path / "out" / row["mask"]), cv2.IMREAD_UNCHANGED)
    assert (row["height"], row["width"]) == mask.shape == (16, 8) and (mask[:4, :4] == 2).all()
    # Declaring the stored size is refused up front, with the displayed size named.
    (raw / "cvat" / "annotations.xml").write_text(
        (raw / "cvat" / "annotations.xml").read_text().replace('width="8" height="16"', 'width="16" height="8"')
    )
    with pytest.raises(ValueError, match=r"image 'a\.jpg': declared width x height = 16x8 but .*a\.jpg is 8x16"):
        read_cvat(raw)


def _labels_meta(names: list[str]) -> str:
    labels = "".join(f"<label><name>{name}</name></label>" for name in names)
    return f"<meta><task><name>t</name><labels>{labels}</labels></task></meta>"


@pytest.mark.parametrize(
    ("names", "accepted"),
    [
        ([f"l{i}" for i in range(1, 255)], True),  # class ids 0..254
        (["background", *(f"l{i}" for i in range(1, 255))], True),  # background is class 0, not another id
        ([f"l{i}" for i in range(1, 256)], False),  # l255 would be class 255, the ignore index
        ([f"l{i}" for i in range(1, 301)], False),  # l256.. would overflow the uint8 mask
    ],
)
def test_labels_beyond_the_8bit_class_ids_are_refused(tmp_path, names, accepted):
    last = names[-1]
    body = (
        f'<image id="0" name="a.png" width="8" height="8"><box label="{last}" xtl="0" ytl="0" xbr="3" ybr="3"/>'
        "</image>"
    )
    raw = make_export(tmp_path, body, {"a.png": (8, 8)}, meta=_labels_meta(names))
    if accepted:
        classes, samples = read_cvat(raw)
        assert classes.num_classes == 255 and samples[0].build_mask()[0, 0] == 254
        return
    count = len(names)
    with pytest.raises(
        ValueError, match=rf"annotations\.xml: declares {count} labels besides background; at most 254 are allowed"
    ):
        read_cvat(raw)


class CountingName(str):
    """A label name that counts the equality comparisons made with it."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountingName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__

    def strip(self, chars: str | None = None) -> CountingName:
        return CountingName(str.strip(self, chars))


def test_label_declarations_are_merged_with_a_bounded_number_of_comparisons(tmp_path, monkeypatch):
    # Each declared label was compared with every earlier one, three times over: 8000 labels took 2 s (and
    # 80 000 would take minutes) before any check on their number. Two files declaring the same 254 labels:
    names = [f"l{i}" for i in range(254)]
    body = '<image id="0" name="a.png" width="8" height="8"/>'
    raw = make_export(tmp_path, body, {"a.png": (8, 8)}, meta=_labels_meta(names))
    (raw / "cvat" / "more.xml").write_text(
        (raw / "cvat" / "annotations.xml")
        .read_text()
        .replace('<image id="0" name="a.png"', '<image id="1" name="b.png"')
    )
    cv2.imwrite(str(raw / "images" / "b.png"), np.zeros((8, 8, 3), np.uint8))
    parse_xml = cvat.parse_xml

    def parse_counting(path: Path):
        root = parse_xml(path)
        for name in root.iter("name"):
            name.text = CountingName(name.text)
        return root

    monkeypatch.setattr(cvat, "parse_xml", parse_counting)
    CountingName.comparisons = 0
    classes, _ = read_cvat(raw)
    assert classes.names == ("background", *names)
    assert CountingName.comparisons <= 4 * len(names)  # was ~3 * 254**2 / 2 = 97 000


def test_video_frame_images_are_listed_once(tmp_path, monkeypatch):
    # Every frame globbed the whole images/ folder: 4000 frames took 10 s, growing as frames squared.
    frames = 40
    meta = f"""<meta><task><name>v</name><size>{frames}</size>
<original_size><width>8</width><height>8</height></original_size>{LABELS}</task></meta>"""
    body = '<track id="0" label="car"><box frame="0" outside="0" xtl="0" ytl="0" xbr="3" ybr="3"/></track>'
    images = {f"frame_{i:06d}.png": (8, 8) for i in range(frames)}
    raw = make_export(tmp_path, body, images, meta=meta)
    cv2.imwrite(str(raw / "images" / "frame_000003.jpg"), np.zeros((8, 8, 3), np.uint8))  # sorts first: counts
    listed = []
    for name in ("scandir", "listdir"):
        original = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", _f=original: listed.append(Path(path)) or _f(path))
    _, samples = read_cvat(raw, val_fraction=0.0)
    monkeypatch.undo()
    assert len(samples) == frames and listed.count(raw / "images") == 1
    assert {s.key: s.source.name for s in samples}["default/frame_000003"] == "frame_000003.jpg"


@pytest.mark.parametrize(
    ("file_name", "folder_name"), [("x.png", "x.png/y.png"), ("x", "x/y.png"), ("x.jpg", "x.jpg/z/y.png")]
)
def test_image_names_whose_outputs_clash_are_refused_before_writing(tmp_path, file_name, folder_name):
    # images/train/x.png would have to be a file (image x.png) and a folder (image x.png/y.png): a raw
    # FileExistsError from deep inside the writer.
    body = (
        f'<image id="0" name="{file_name}" width="8" height="8" subset="train"/>'
        f'<image id="1" name="{folder_name}" width="8" height="8" subset="train"/>'
    )
    raw = make_export(tmp_path / "raw", body, {f"train/{folder_name}": (8, 8)})
    encoded = cv2.imencode(Path(file_name).suffix or ".png", np.zeros((8, 8, 3), np.uint8))[1]
    (raw / "images" / file_name).write_bytes(encoded.tobytes())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        ValueError, match=rf"images/{re.escape(file_name)} and .*images/train/{re.escape(folder_name)} cannot both be"
    ):
        run_preprocess("cvat", raw, out)
    assert list(out.iterdir()) == []
