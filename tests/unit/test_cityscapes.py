"""Cityscapes: the official id -> train id mapping on the real frame, polygons rasterisation, tree walking."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segmentation.data.cityscapes import iter_cityscapes, label_ids_to_train_ids, rasterize_polygons
from segmentation.data.cityscapes_labels import LABELS
from segmentation.data.preprocess import run_preprocess

FRAME = "val/frankfurt/frankfurt_000000_000294"


def official_lut(csv_path: Path) -> dict[int, int]:
    """id -> trainId straight from the transcribed official table (independent of the package's own table)."""
    table = pd.read_csv(csv_path)
    return {int(r.id): (255 if r.trainId in (-1, 255) else int(r.trainId)) for r in table.itertuples() if r.id >= 0}


def test_package_table_equals_official_csv(shared_data):
    table = pd.read_csv(shared_data / "cityscapes_labels.csv")
    assert [(n, i, t, c, rgb) for n, i, t, c, rgb in LABELS] == [
        (r.name, r.id, r.trainId, r.category, (r.r, r.g, r.b)) for r in table.itertuples()
    ]


def test_real_frame_train_ids(shared_data, tmp_path):
    raw = shared_data / "cityscapes_sample"
    label_ids = cv2.imread(str(raw / "gtFine" / f"{FRAME}_gtFine_labelIds.png"), cv2.IMREAD_UNCHANGED)
    lut = official_lut(shared_data / "cityscapes_labels.csv")
    expected = np.vectorize(lambda v: lut[int(v)])(label_ids).astype(np.uint8)

    samples = list(iter_cityscapes(raw))
    assert [s.key for s in samples] == [FRAME] and samples[0].split == "val" and samples[0].city == "frankfurt"
    mask = samples[0].build_mask()
    assert np.array_equal(mask, expected)  # every pixel
    # The shipped labelTrainIds was downscaled separately: it agrees except on 77 boundary pixels (see README).
    shipped = cv2.imread(str(raw / "gtFine" / f"{FRAME}_gtFine_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
    assert (mask != shipped).sum() <= 77
    assert set(np.unique(mask)) == set(np.unique(shipped)) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 255}

    table = run_preprocess("cityscapes", raw, tmp_path / "out")
    df = pd.read_parquet(table)
    written = cv2.imread(str(tmp_path / "out" / df.loc[0, "mask"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, expected) and (df.loc[0, "height"], df.loc[0, "width"]) == (128, 256)


def test_real_polygons_sample(shared_data):
    path = shared_data / "cityscapes_polygons_sample" / "gtFine" / "train" / "aa" / "aa_000000_gtFine_polygons.json"
    label_ids = rasterize_polygons(json.loads(path.read_text()), path)
    counts = dict(zip(*np.unique(label_ids, return_counts=True), strict=True))
    assert label_ids.shape == (1024, 2048) and set(counts) == {0, 8, 26}
    assert abs(counts[8] - 5780) < 300 and abs(counts[26] - 17529) < 600
    train_ids = label_ids_to_train_ids(label_ids)
    assert (train_ids[label_ids == 26] == 13).all() and (train_ids[label_ids == 8] == 1).all()
    assert (train_ids[label_ids == 0] == 255).all()


def test_polygons_order_deleted_group_and_unknown():
    square = [[2, 2], [7, 2], [7, 7], [2, 7]]
    ann = {
        "imgHeight": 10,
        "imgWidth": 10,
        "objects": [
            {"label": "road", "polygon": [[0, 0], [9, 0], [9, 9], [0, 9]]},
            {"label": "cargroup", "polygon": square},
            {"label": "person", "polygon": square, "deleted": 1},
            {"label": "license plate", "polygon": square},
            {"label": "sky", "polygon": [[0, 0], [1, 0], [1, 1], [0, 1]]},
        ],
    }
    ids = rasterize_polygons(ann)
    assert ids[5, 5] == 26 and ids[9, 9] == 7 and ids[0, 0] == 23  # later on top; group -> car; deleted skipped
    ann["objects"].append({"label": "spaceship", "polygon": square})
    with pytest.raises(ValueError, match="unknown label 'spaceship'"):
        rasterize_polygons(ann, "x.json")


def _tree(tmp_path: Path, shared_data: Path) -> Path:
    raw = tmp_path / "cs"
    shutil.copytree(shared_data / "cityscapes_sample", raw, ignore=shutil.ignore_patterns("README.md"))
    return raw


def test_test_split_without_labels_and_train_from_polygons(tmp_path, shared_data):
    raw = _tree(tmp_path, shared_data)
    image = raw / "leftImg8bit" / f"{FRAME}_leftImg8bit.png"
    (raw / "leftImg8bit/test/bonn").mkdir(parents=True)
    shutil.copy(image, raw / "leftImg8bit/test/bonn/bonn_000000_000001_leftImg8bit.png")
    (raw / "leftImg8bit/train/aa").mkdir(parents=True)
    shutil.copy(image, raw / "leftImg8bit/train/aa/aa_000000_000001_leftImg8bit.png")
    (raw / "gtFine/train/aa").mkdir(parents=True)
    car = {"label": "car", "polygon": [[0, 0], [20, 0], [20, 20]]}
    polygons = {"imgHeight": 128, "imgWidth": 256, "objects": [car]}
    (raw / "gtFine/train/aa/aa_000000_000001_gtFine_polygons.json").write_text(json.dumps(polygons))
    df = pd.read_parquet(run_preprocess("cityscapes", raw, tmp_path / "out"))
    assert list(df["split"]) == ["train", "val", "test"] and list(df["labeled"]) == [True, True, False]
    test_mask = cv2.imread(str(tmp_path / "out" / df.loc[2, "mask"]), cv2.IMREAD_UNCHANGED)
    assert test_mask.shape == (128, 256) and (test_mask == 255).all()
    train_mask = cv2.imread(str(tmp_path / "out" / df.loc[0, "mask"]), cv2.IMREAD_UNCHANGED)
    assert train_mask[1, 15] == 13 and train_mask[100, 100] == 255


@pytest.mark.parametrize("case", ["no_labels", "bad_label_id", "size_mismatch", "empty", "corrupt_image"])
def test_bad_input(tmp_path, shared_data, case):
    raw = _tree(tmp_path, shared_data)
    labels = raw / "gtFine" / f"{FRAME}_gtFine_labelIds.png"
    image = raw / "leftImg8bit" / f"{FRAME}_leftImg8bit.png"
    if case == "no_labels":
        labels.unlink()
        error, message = FileNotFoundError, "no labels found"
    elif case == "bad_label_id":
        cv2.imwrite(str(labels), np.full((128, 256), 200, np.uint8))
        error, message = ValueError, r"labelIds.png: label ids \[200\]"
    elif case == "size_mismatch":
        cv2.imwrite(str(labels), np.full((64, 256), 7, np.uint8))
        error, message = (
            ValueError,
            r"labelIds\.png: label image is 256x64 \(W x H, from its header\) but .*is 256x128",
        )
    elif case == "empty":
        shutil.rmtree(raw)
        raw.mkdir()
        error, message = ValueError, "is empty"
    else:
        image.write_bytes(image.read_bytes()[:1000])
        error, message = ValueError, "truncated PNG"
    with pytest.raises(error, match=message):
        run_preprocess("cityscapes", raw, tmp_path / "out")
    assert not (tmp_path / "out" / "split").exists()


def _polygons_tree(root: Path, declared: tuple[int, int], objects: list, image: tuple[int, int] = (64, 128)) -> Path:
    """A one-image train tree labelled by polygons: a black ``image`` (H, W) PNG and a JSON declaring ``declared``."""
    (root / "leftImg8bit/train/aa").mkdir(parents=True)
    (root / "gtFine/train/aa").mkdir(parents=True)
    cv2.imwrite(str(root / "leftImg8bit/train/aa/aa_000000_000001_leftImg8bit.png"), np.zeros((*image, 3), np.uint8))
    polygons = {"imgHeight": declared[0], "imgWidth": declared[1], "objects": objects}
    (root / "gtFine/train/aa/aa_000000_000001_gtFine_polygons.json").write_text(json.dumps(polygons))
    return root


def test_polygons_declared_size_must_match_image_header(tmp_path):
    car = {"label": "car", "polygon": [[0, 0], [20, 0], [20, 20]]}
    ok = list(iter_cityscapes(_polygons_tree(tmp_path / "ok", (64, 128), [car])))[0].build_mask()
    assert ok.shape == (64, 128) and ok[1, 15] == 13
    # Declared 20000 x 20000 for a 128 x 64 image: refused from the PNG header, before 400 MB are allocated.
    sample = list(iter_cityscapes(_polygons_tree(tmp_path / "bad", (20000, 20000), [car])))[0]
    with pytest.raises(
        ValueError,
        match=r"polygons\.json: declared imgWidth x imgHeight = 20000x20000 but the "
        r"image is 128x64 \(W x H\)",
    ):
        sample.build_mask()


MALFORMED = {
    "objects_not_list": ({"objects": {"label": "car"}}, r"field 'objects' must be a list"),
    "object_not_dict": ({"objects": ["car"]}, r"object 0 must be a JSON object .* found 'car'"),
    "label_not_string": (
        {"objects": [{"label": 7, "polygon": [[0, 0], [5, 0], [5, 5]]}]},
        r"object 0: field 'label' must be a string, found 7",
    ),
    "polygon_not_list": (
        {"objects": [{"label": "car", "polygon": "0,0 5,0 5,5"}]},
        r"object 0 \('car'\): field 'polygon' must be a list of >= 3 \[x, y\] points, found '0,0",
    ),
    "coordinate_not_number": (
        {"objects": [{"label": "car", "polygon": [[0, 0], ["5", 0], [5, 5]]}]},
        r"object 0 \('car'\): field 'polygon': every point must be a list of two numbers "
        r"\[x, y\], found \['5', 0\]",
    ),
    "coordinate_bool": (
        {"objects": [{"label": "car", "polygon": [[0, 0], [True, 0], [5, 5]]}]},
        r"object 0 \('car'\): field 'polygon': every point",
    ),
    "point_not_pair": (
        {"objects": [{"label": "road", "polygon": [[0, 0], [5, 0, 1], [5, 5]]}]},
        r"object 0 \('road'\): field 'polygon': every point",
    ),
    "height_not_int": ({"imgHeight": "10"}, r"imgHeight must be a positive integer .* found '10'"),
    "width_zero": ({"imgWidth": 0}, r"imgWidth must be a positive integer .* found 0"),
    "height_negative": ({"imgHeight": -3}, r"imgHeight must be a positive integer .* found -3"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_polygons_name_file_object_and_field(case):
    change, message = MALFORMED[case]
    objects = [
        {"label": "road", "polygon": [[0, 0], [9, 0], [9, 9]]},
        {"label": "car", "polygon": [[1, 1], [4, 1], [4, 4]]},
    ]
    annotation = {"imgHeight": 10, "imgWidth": 10, "objects": objects} | change
    with pytest.raises(ValueError, match=r"^x_gtFine_polygons\.json: " + message):
        rasterize_polygons(annotation, "x_gtFine_polygons.json")


@pytest.mark.parametrize("far", [5e9, -5e9, 2**31, 31.0])
def test_polygon_far_outside_the_image_is_refused_quickly(far):
    # 5e9 overflows int32 when rounded: OpenCV spent ~18 s filling the wrapped-around polygon, then accepted it.
    # The margin is the image's longer side (10 px here), so 31 is just beyond [-10, 20].
    car = {"label": "car", "polygon": [[0, 0], [far, 0], [5, 5]]}
    annotation = {"imgHeight": 10, "imgWidth": 10, "objects": [car]}
    start = time.perf_counter()
    message = f"p.json: object 0 ('car'): field 'polygon': point [{far:g}, 0] lies outside the 10x10 (W x H) image"
    with pytest.raises(ValueError, match="^" + re.escape(message) + r" by more than 10 px; .* \[-10, 20\]"):
        rasterize_polygons(annotation, "p.json")
    assert time.perf_counter() - start < 1.0


def test_polygon_just_beside_the_image_is_drawn():
    # Released polygons do touch or cross the border (x = 2048 on a 2048-wide frame): clipped, not refused.
    annotation = {
        "imgHeight": 10,
        "imgWidth": 10,
        "objects": [{"label": "car", "polygon": [[-3, -3], [12, -3], [12, 12], [-3, 12]]}],
    }
    assert (rasterize_polygons(annotation, "p.json") == 26).all()


def _annotation(height: str = "64", objects: str = "") -> str:
    return f'{{"imgHeight": {height}, "imgWidth": 128, "objects": [{objects}]}}'


HOSTILE_JSON = {
    # 10**400 is a valid JSON number; converting it to float64 raised OverflowError.
    "huge_coordinate": (
        _annotation(objects=f'{{"label": "car", "polygon": [[0, 0], [10, 0], [{10**400}, 10]]}}'),
        r"object 0 \('car'\): field 'polygon': coordinate 1000+\.\.\.0+ is beyond float64's range",
    ),
    # Python's parser recurses per level: RecursionError.
    "deep_nesting": (
        _annotation(objects="[" * 100_000 + "]" * 100_000),
        r"not a Cityscapes polygons file \(JSON nested deeper",
    ),
    # Python refuses to parse integers of more than 4300 digits: a ValueError without the file's name.
    "integer_of_5000_digits": (_annotation(height="1" + "0" * 5000), r"not valid JSON \(.*4300"),
    "huge_declared_height": (
        _annotation(height="1" + "0" * 400),
        r"declared imgWidth x imgHeight = 128x1000+\.\.\.0+ but the image is 128x64",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_hostile_polygons_json_is_refused_naming_the_file(tmp_path, case):
    text, message = HOSTILE_JSON[case]
    raw = _polygons_tree(tmp_path, (64, 128), [])
    path = raw / "gtFine/train/aa/aa_000000_000001_gtFine_polygons.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}") as info:
        list(iter_cityscapes(raw))[0].build_mask()
    assert len(str(info.value)) < 400  # an excerpt of the value, not all its digits
