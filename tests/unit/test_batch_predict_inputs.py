"""batch_predict without Spark running: input forms, the per-file check, output names, the table, Java, parameters."""

from __future__ import annotations

import base64
import shlex
import stat
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from mlflow.projects import _project_spec

from entrypoints import batch_predict as entry
from segmentation.data.cityscapes_labels import class_to_label_id_lut
from segmentation.data.classes import ClassInfo
from segmentation.mlops.serving_requests import decode_image
from segmentation.mlops.spark_scoring import ImageSource, check_image, image_source, output_stem
from segmentation.steps.batch_predict import PIXELS_PREFIX, batch_predict_step, build_table, check_java


def _png(height: int = 20, width: int = 30) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 90, np.uint8))[1].tobytes()


def test_input_forms(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    assert image_source(str(tmp_path)) == ImageSource(str(tmp_path))
    assert image_source(f"{tmp_path}/") == ImageSource(str(tmp_path))
    assert image_source(str(tmp_path / "a.png")) == ImageSource(str(tmp_path), "a.png", recursive=False)
    assert image_source(f"{tmp_path}/*.png") == ImageSource(str(tmp_path), "*.png", recursive=False)
    assert image_source(f"{tmp_path}/**/*.{{png,jpg}}") == ImageSource(str(tmp_path), "*.{png,jpg}", recursive=True)
    assert image_source(f"{tmp_path}/**") == ImageSource(str(tmp_path), "*", recursive=True)
    assert image_source("hdfs://nn:8020/data/**/*.png") == ImageSource("hdfs://nn:8020/data", "*.png", True)


def test_wildcards_in_folder_names_are_refused_with_the_forms_that_work():
    with pytest.raises(ValueError, match=r"wildcards are allowed in the file name only.*'images/\*\*/\*\.png'"):
        image_source("data/city_*/frames/*.png")


def test_output_names_are_input_paths_relative_to_the_root_without_suffix():
    assert output_stem("file:/in/a/b.jpg", "file:/in/") == "a/b"
    assert output_stem("file:/in/c.d.png", "file:/in/") == "c.d"
    assert output_stem("file:/elsewhere/x.png", "file:/in/") == "x"


def test_the_check_accepts_what_the_pyfunc_decodes_and_gives_its_400_message_otherwise():
    data = _png()
    text, error = check_image(data, max_pixels=10_000, max_bytes=10**6)
    assert error is None and decode_image(text).shape == (20, 30, 3)
    assert base64.b64decode(text) == data
    _, error = check_image(data[: len(data) // 2], 10_000, 10**6)
    assert error == "the PNG/JPEG data is corrupt or truncated and could not be decoded"
    _, error = check_image(b"hello", 10_000, 10**6)
    assert error.startswith("not a PNG or JPEG image (5 bytes")
    _, error = check_image(data, max_pixels=599, max_bytes=10**6)
    assert "image is 30x20, padded to 64x64 = 4096 pixels for the network, more than the limit of 599" in error
    _, error = check_image(data, max_pixels=10_000, max_bytes=10)
    assert "more than the limit of 10 bytes" in error and "SEGMENTATION_MAX_REQUEST_BYTES" in error


def test_table_has_one_pixel_column_per_class_and_nulls_for_refused_files():
    classes = ClassInfo(("road", "traffic light"), ((1, 2, 3), (4, 5, 6)))
    rows = [
        {"path": "file:/in/b.png", "height": 2, "width": 3, "mask_path": "mask/b.png", "color_path": None,
         "label_ids_path": None, "error": None, "pixels": [4, 2]},
        {"path": "file:/in/a.png", "height": None, "width": None, "mask_path": None, "color_path": None,
         "label_ids_path": None, "error": "corrupt", "pixels": None},
    ]  # fmt: skip
    table = build_table(rows, classes, colorize=False)
    assert list(table.columns) == [
        "path", "height", "width", "mask_path", "error", f"{PIXELS_PREFIX}road", f"{PIXELS_PREFIX}traffic light"
    ]  # fmt: skip
    assert table["path"].tolist() == ["/in/a.png", "/in/b.png"]
    assert table[f"{PIXELS_PREFIX}traffic light"].tolist()[1] == 2 and table["height"].isna().tolist() == [True, False]
    assert "color_path" in build_table(rows, classes, colorize=True).columns
    assert "label_ids_path" in build_table(rows, classes, colorize=False, cityscapes=True).columns


def test_cityscapes_results_hold_label_ids_and_other_classes_are_refused():
    lut = class_to_label_id_lut(ClassInfo.cityscapes().names)
    # train ids 0..18 are the label ids the benchmark scores: road 7 ... bicycle 33
    assert lut[:19].tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert class_to_label_id_lut(("sky", "car"))[:2].tolist() == [23, 26]
    with pytest.raises(ValueError, match=r"classes \['lane marking'\] are not Cityscapes labels"):
        class_to_label_id_lut(("road", "lane marking"))


def test_missing_java_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"needs Java 17 or newer: no `java` on PATH and JAVA_HOME is unset"):
        check_java()


def test_old_java_is_named(tmp_path, monkeypatch):
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"needs Java 17 or newer; .* is Java 11"):
        check_java()


def test_a_missing_input_fails_before_spark_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        batch_predict_step("models:/m@production", str(tmp_path / "nope"), tmp_path / "out")
    assert entry.main(["--model-uri", "m", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2


def test_every_mlproject_parameter_reaches_the_step(repo, monkeypatch, tmp_path):
    spec = _project_spec.load_project(str(repo)).get_entry_point("batch_predict")
    values = {
        "model_uri": "models:/m/3",
        "input": "/images/**/*.png",
        "output": "/out",
        "master": "spark://host:7077",
        "colorize": "true",
        "cityscapes": "true",
        "env_manager": "virtualenv",
        "batch_size": "4",
    }
    assert set(values) == set(spec.parameters)
    for name, value in values.items():
        assert str(spec.parameters[name].default) != value, name
    words = shlex.split(spec.compute_command(values, storage_dir=str(tmp_path)))
    assert words[:3] == ["python", "-m", "entrypoints.batch_predict"]
    call = {}

    def record(*args, **kwargs):
        call.update(args=args, kwargs=kwargs)
        return SimpleNamespace(images=2, failed=0, seconds=1.0, images_per_s=2.0, table="/out/predictions.parquet")

    monkeypatch.setattr(entry, "batch_predict_step", record)
    assert entry.main(words[3:]) == 0
    assert call["args"] == ("models:/m/3", "/images/**/*.png", "/out")
    assert call["kwargs"] == {
        "master": "spark://host:7077",
        "colorize": True,
        "cityscapes": True,
        "env_manager": "virtualenv",
        "batch_size": 4,
    }
