"""Batch prediction on the real Cityscapes frame: masks of the input size, colours from the model, bad inputs."""

from __future__ import annotations

import logging
import shutil

import cv2
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from entrypoints.predict import main as predict_main
from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.inference.files import collect_images
from segmentation.models import FCHarDNet
from segmentation.models.package import save_model_package
from segmentation.models.preprocessing import to_input_tensor
from segmentation.steps.predict import predict_step

FRAME = "cityscapes_sample/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
# Non-Cityscapes colours prove the outputs use the classes stored with the model, not a built-in palette.
CLASSES = ClassInfo(
    tuple(f"c{i}" for i in range(5)), ((10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (250, 250, 0))
)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = FCHarDNet(num_classes=5).eval()
    return save_model_package(model, CLASSES, ModelConfig(num_classes=5), tmp_path_factory.mktemp("pkg") / "pkg")


@pytest.fixture
def frame_dir(shared_data, tmp_path):
    """The real frame (256 x 128), an odd-sized crop of it and a grey copy, in a nested folder."""
    frame = cv2.imread(str(shared_data / FRAME))
    folder = tmp_path / "in"
    (folder / "city").mkdir(parents=True)
    cv2.imwrite(str(folder / "city" / "frame.png"), frame)
    cv2.imwrite(str(folder / "crop.jpg"), frame[10:61, 5:82])  # 51 x 77: below the network's 64 px minimum
    cv2.imwrite(str(folder / "grey.png"), cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    return folder


def test_masks_have_input_size_and_class_values(package, frame_dir, tmp_path):
    report = predict_step(str(package), frame_dir, tmp_path / "out", device="cpu")
    assert not report.skipped and len(report.outputs["mask"]) == 3
    for source, rel in (("city/frame.png", "city/frame.png"), ("crop.jpg", "crop.png"), ("grey.png", "grey.png")):
        image = cv2.imread(str(frame_dir / source))
        mask = cv2.imread(str(tmp_path / "out" / "mask" / rel), cv2.IMREAD_UNCHANGED)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(CLASSES.num_classes))
        color = cv2.imread(str(tmp_path / "out" / "color" / rel))[..., ::-1]
        np.testing.assert_array_equal(color, CLASSES.colormap[mask])
        assert cv2.imread(str(tmp_path / "out" / "overlay" / rel)).shape == image.shape


def test_mask_is_the_networks_argmax_at_full_resolution(package, shared_data, tmp_path):
    from segmentation.mlops.model_store import load_model

    model, _ = load_model(str(package))
    image = cv2.imread(str(shared_data / FRAME))
    with torch.inference_mode():
        logits = model(to_input_tensor(image))[0].numpy()
    expected = logits.argmax(0)
    predict_step(str(package), shared_data / FRAME, tmp_path / "out", device="cpu")
    mask = cv2.imread(str(tmp_path / "out" / "mask" / "frankfurt_000000_000294_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == expected.shape
    # The deployed session sums in another order (and over zero-padded channels on some CPUs): a pixel whose two
    # best classes tie within float rounding may go either way, nothing else may differ.
    differ = mask != expected
    assert differ.mean() <= 1e-4, f"{int(differ.sum())} pixels differ from the network's argmax"
    rows, cols = differ.nonzero()
    gap = logits[expected[differ], rows, cols] - logits[mask[differ].astype(np.int64), rows, cols]
    assert (gap <= 2e-3).all(), f"pixels whose chosen class scores up to {gap.max():.3g} below the best"


def test_outputs_inside_the_input_folder_are_not_read_back(package, frame_dir):
    first = predict_step(str(package), frame_dir, frame_dir / "pred", device="cpu")
    second = predict_step(str(package), frame_dir, frame_dir / "pred", device="cpu")
    assert len(first.outputs["mask"]) == len(second.outputs["mask"]) == 3


def test_glob_input(package, frame_dir, tmp_path):
    report = predict_step(str(package), str(frame_dir / "**" / "*.png"), tmp_path / "out", device="cpu")
    assert sorted(p.relative_to(tmp_path / "out" / "mask").as_posix() for p in report.outputs["mask"]) == [
        "city/frame.png",
        "grey.png",
    ]


def test_unreadable_files_are_skipped_with_a_warning(package, frame_dir, tmp_path, caplog):
    (frame_dir / "broken.png").write_bytes(b"not a png at all")
    with caplog.at_level(logging.WARNING, logger="segmentation.steps.predict"):
        report = predict_step(str(package), frame_dir, tmp_path / "out", device="cpu")
    assert list(report.skipped) == [frame_dir / "broken.png"] and len(report.outputs["mask"]) == 3
    assert "broken.png" in caplog.text and "skipped 1 unreadable" in caplog.text
    assert not (tmp_path / "out" / "mask" / "broken.png").exists()


def test_truncated_and_oversized_images_are_skipped_with_their_reasons(package, frame_dir, tmp_path, monkeypatch):
    """Serving's per-image limit (SEGMENTATION_MAX_PIXELS) holds for the predict step too, checked from headers, and
    a truncated JPEG is refused instead of being predicted with grey rows; the other images are still predicted."""
    data = (frame_dir / "crop.jpg").read_bytes()
    (frame_dir / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("SEGMENTATION_MAX_PIXELS", str(77 * 64))  # crop.jpg is 77 x 51, padded to 77 x 64
    report = predict_step(str(package), frame_dir, tmp_path / "out", device="cpu")
    assert [p.name for p in report.outputs["mask"]] == ["crop.png"]
    assert sorted(p.name for p in report.skipped) == ["cut.jpg", "frame.png", "grey.png"]
    assert "cut.jpg: truncated JPEG file" in report.skipped[frame_dir / "cut.jpg"]
    assert (
        "grey.png: image is 256x128 = 32768 pixels, more than the limit of 4928"
        in report.skipped[frame_dir / "grey.png"]
    )


def test_nothing_readable_is_an_error_and_exits_non_zero(package, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    (folder / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"none of the 2 input image\(s\) could be read: .*a\.png.*b\.jpg"):
        predict_step(str(package), folder, tmp_path / "out", device="cpu")
    assert (
        predict_main(
            [
                "--model-uri",
                str(package),
                "--input",
                str(folder),
                "--out-dir",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )


def test_empty_folder_and_missing_input_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images in folder"):
        collect_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="matches no files"):
        collect_images(str(tmp_path / "*.png"))


def test_overlays_are_logged_into_an_active_run(package, frame_dir, tmp_path, tracking_uri):
    with mlflow.start_run() as run:
        report = predict_step(str(package), frame_dir, tmp_path / "out", device="cpu", num_logged=2)
    assert report.logged == 2
    logged = MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "predict/overlays")
    assert len(logged) == 2
    no_run = predict_step(str(package), frame_dir, tmp_path / "out2", device="cpu", num_logged=2)
    assert no_run.logged == 0


def test_symlinks_odd_names_and_a_file_as_out_dir(package, frame_dir, tmp_path, caplog):
    """Links inside the input folder are followed, links leading out of it are skipped with a message, a file
    named ``..png`` is predicted, and an out_dir that is a file is refused before any work."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    image = frame_dir / "grey.png"
    shutil.copy(image, folder / "..png")
    shutil.copy(frame_dir / "city" / "frame.png", folder / "real.png")
    (folder / "inside.png").symlink_to(folder / "real.png")
    outside = tmp_path / "elsewhere.png"
    shutil.copy(image, outside)
    (folder / "outside.png").symlink_to(outside)
    with caplog.at_level("WARNING"):
        report = predict_step(str(package), folder, tmp_path / "out", device="cpu")
    names = sorted(p.name for p in report.outputs["mask"])
    assert names == ["..png.png", "inside.png", "real.png"]
    assert any("outside.png" in r.message and "outside the input folder" in r.message for r in caplog.records)
    mask = cv2.imread(str(tmp_path / "out" / "mask" / "..png.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == cv2.imread(str(image)).shape[:2]
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir .*a_file is a file, not a folder"):
        predict_step(str(package), folder, tmp_path / "a_file", device="cpu")
