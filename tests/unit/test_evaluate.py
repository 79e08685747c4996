"""Evaluation core: whole-split metrics against an independent numpy computation, TTA, sliding window, errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from segmentation.data.classes import ClassInfo, overlay
from segmentation.evaluation.evaluate import check_classes, evaluate_model
from segmentation.evaluation.visualize import render_confusion_matrix, render_iou_bars, render_panel
from segmentation.inference.tta import predict_logits
from segmentation.mlops.eval_logging import data_key
from segmentation.models import FCHarDNet

CLASSES = ClassInfo(("road", "car", "sky", "tree"), ((128, 64, 128), (0, 0, 142), (70, 130, 180), (107, 142, 35)))


class NearestClass(nn.Module):
    """Known predictions: each pixel gets the class id nearest to input channel 0 (logits -(x0 - c)^2).

    ``tilt`` adds a left-right antisymmetric bias (+ on one side, - on the other) that a flip average cancels.
    """

    def __init__(self, num_classes: int, tilt: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.tilt = num_classes, tilt
        self.seen: list[tuple[int, int]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(image.shape[-2:]))
        ids = torch.arange(self.num_classes, dtype=image.dtype).view(1, -1, 1, 1)
        logits = -((image[:, :1] - ids) ** 2)
        if self.tilt:
            ramp = torch.linspace(-1, 1, image.shape[-1], dtype=image.dtype).view(1, 1, 1, -1)
            logits = logits + self.tilt * ramp * (ids - (self.num_classes - 1) / 2)
        return logits


class InMemory(Dataset):
    def __init__(self, images: list[torch.Tensor], masks: list[np.ndarray]) -> None:
        self.images, self.masks = images, masks
        self.image_names = [f"img{i}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], torch.from_numpy(self.masks[i].astype(np.int64))


def _image_encoding(pred: np.ndarray) -> torch.Tensor:
    image = torch.zeros(3, *pred.shape)
    image[0] = torch.from_numpy(pred.astype(np.float32))
    return image


def _numpy_scores(preds: list[np.ndarray], masks: list[np.ndarray], num_classes: int) -> dict:
    """Benchmark definitions, written out per class with boolean masks (no bincount, no shared code)."""
    pred = np.concatenate([p.ravel() for p in preds])
    gt = np.concatenate([m.ravel() for m in masks])
    valid = gt != 255
    iou, acc = [], []
    for c in range(num_classes):
        tp = np.sum((gt == c) & (pred == c) & valid)
        fp = np.sum((gt != c) & (pred == c) & valid)
        fn = np.sum((gt == c) & (pred != c) & valid)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(tp / (tp + fn) if tp + fn else math.nan)
    return {
        "mIoU": np.nanmean(iou),
        "pixel_acc": np.sum((pred == gt) & valid) / valid.sum(),
        "mean_acc": np.nanmean(acc),
        "iou": iou,
    }


@pytest.fixture
def split():
    """Three images (two sizes) whose predictions are known; ground truth corrupted 10 %, 50 %, 30 % + ignore."""
    rng = np.random.default_rng(0)
    preds, masks = [], []
    for shape, corrupt in (((64, 96), 0.1), ((64, 96), 0.5), ((80, 64), 0.3)):
        pred = rng.integers(0, 3, shape)  # class 3 ("tree") is never predicted
        mask = pred.copy()
        flip = rng.random(shape) < corrupt
        mask[flip] = rng.integers(0, 4, flip.sum())
        mask[rng.random(shape) < 0.05] = 255
        preds.append(pred)
        masks.append(mask)
    return preds, masks, InMemory([_image_encoding(p) for p in preds], masks)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_metrics_equal_independent_numpy_computation(split, batch_size):
    preds, masks, dataset = split
    result = evaluate_model(NearestClass(4), CLASSES, dataset, batch_size=batch_size, num_worst=2)
    expected = _numpy_scores(preds, masks, 4)
    assert result.metrics["eval/mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
    assert result.metrics["eval/pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-12)
    assert result.metrics["eval/mean_acc"] == pytest.approx(expected["mean_acc"], abs=1e-12)
    for name, value in zip(CLASSES.names, expected["iou"], strict=True):
        assert result.metrics[f"eval/IoU/{name}"] == pytest.approx(value, abs=1e-12)
    assert int(result.matrix.sum()) == sum(int((m != 255).sum()) for m in masks)


def test_split_is_one_confusion_matrix_not_a_mean_of_images(split):
    preds, masks, dataset = split
    result = evaluate_model(NearestClass(4), CLASSES, dataset)
    per_image_mean = np.mean([_numpy_scores([p], [m], 4)["mIoU"] for p, m in zip(preds, masks, strict=True)])
    assert result.metrics["eval/mIoU"] != pytest.approx(per_image_mean, abs=1e-6)
    assert [v for _, v in result.per_image] == pytest.approx(
        [_numpy_scores([p], [m], 4)["mIoU"] for p, m in zip(preds, masks, strict=True)]
    )


def test_worst_images_are_the_lowest_scoring(split):
    preds, masks, dataset = split
    result = evaluate_model(NearestClass(4), CLASSES, dataset, num_worst=2)
    assert [w.name for w in result.worst] == ["img1", "img2"]  # corrupted 50 % and 30 %
    worst = result.worst[0]
    np.testing.assert_array_equal(worst.pred, preds[1])
    np.testing.assert_array_equal(worst.mask, masks[1])
    assert worst.image_bgr.shape == (*preds[1].shape, 3) and worst.image_bgr.dtype == np.uint8


def test_absent_class_has_no_iou_metric_and_latency_is_reported(split):
    _, _, dataset = split
    only_road = InMemory(dataset.images[:1], [np.where(dataset.masks[0] == 255, 255, 0)])
    result = evaluate_model(NearestClass(4), CLASSES, only_road)
    assert "eval/IoU/road" in result.metrics
    assert math.isnan(result.iou[3]) and "eval/IoU/tree" not in result.metrics  # neither in truth nor prediction
    assert result.latency.num_images == 1 and result.latency.ms_per_image > 0
    assert result.metrics["eval/images_per_s"] == pytest.approx(1000 / result.latency.ms_per_image)
    assert result.latency.device.startswith("cpu")


def test_real_network_scores_match_its_saved_predictions(tmp_path):
    torch.manual_seed(0)
    model = FCHarDNet(num_classes=4).eval()
    rng = np.random.default_rng(1)
    images = [torch.randn(3, 64, 128), torch.randn(3, 96, 64)]
    masks = [rng.integers(0, 4, tuple(im.shape[1:])).astype(np.uint8) for im in images]
    with torch.inference_mode():
        for i, image in enumerate(images):
            np.save(tmp_path / f"pred{i}.npy", model(image[None]).argmax(1)[0].numpy())
    saved = [np.load(tmp_path / f"pred{i}.npy") for i in range(len(images))]
    result = evaluate_model(model, CLASSES, InMemory(images, masks))
    assert result.metrics["eval/mIoU"] == pytest.approx(_numpy_scores(saved, masks, 4)["mIoU"], abs=1e-12)


def test_flip_tta_cancels_a_left_right_bias():
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 4, (64, 96))
    image = _image_encoding(pred)[None]
    tilted = NearestClass(4, tilt=3.0)
    biased = predict_logits(tilted, image).argmax(1)[0].numpy()
    assert (biased != pred).mean() > 0.2  # the bias really changes predictions near both edges
    flipped = predict_logits(tilted, image, tta="flip")
    torch.testing.assert_close(flipped, NearestClass(4)(image))
    result = evaluate_model(tilted, CLASSES, InMemory([image[0]], [pred]), tta="flip")
    assert result.metrics["eval/pixel_acc"] == 1.0


def test_flip_tta_on_a_mirror_symmetric_image_keeps_it_symmetric():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 3, padding=1)  # not flip-equivariant: an arbitrary kernel
    half = torch.randn(1, 3, 64, 48)
    image = torch.cat([half, half.flip(-1)], dim=-1)
    with torch.inference_mode():
        logits = predict_logits(model, image, tta="flip")
    torch.testing.assert_close(logits, logits.flip(-1))
    torch.testing.assert_close(logits, (model(image) + model(image.flip(-1)).flip(-1)) / 2)


def test_multiscale_resizes_and_returns_input_size():
    model = NearestClass(4)
    image = torch.full((1, 3, 128, 192), 2.0)
    logits = predict_logits(model, image, tta="multiscale", scales=(0.5, 1.0, 1.5))
    assert model.seen == [(64, 96), (128, 192), (192, 288)]
    assert logits.shape == (1, 4, 128, 192)
    torch.testing.assert_close(logits, model(image))  # a constant image looks the same at every scale


@pytest.mark.parametrize("window", [64, 100])
def test_sliding_window_equals_whole_image_for_a_pointwise_model(window):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    recorder = NearestClass(4)  # records the window shapes the model is called with
    image = torch.randn(1, 3, 150, 230)
    with torch.inference_mode():
        whole = model(image)
        windowed = predict_logits(lambda x: (recorder(x), model(x))[1], image, sliding_window=window)
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    assert set(recorder.seen) == {(window, window)} and len(recorder.seen) > 4


def test_sliding_window_close_to_whole_image_for_a_3x3_conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    image = torch.randn(1, 3, 128, 200)
    with torch.inference_mode():
        whole, windowed = model(image), predict_logits(model, image, sliding_window=96)
    # Only pixels within 2 px of a window edge see zero padding instead of their neighbours. Rows: windows 0-95
    # and 32-127; columns: 0-95, 64-159, 104-199. Rows 40-89 x columns 0-59 are at least 2 px inside all of them.
    assert (whole.argmax(1) == windowed.argmax(1)).float().mean() > 0.95
    torch.testing.assert_close(windowed[..., 40:90, :60], whole[..., 40:90, :60])
    assert not torch.allclose(windowed, whole)  # windows were really used


def test_small_inputs_are_padded_for_the_network_and_cropped_back():
    model = FCHarDNet(num_classes=4).eval()
    with torch.inference_mode():
        logits = predict_logits(model, torch.randn(1, 3, 40, 50))
    assert logits.shape == (1, 4, 40, 50)


def test_classes_that_differ_from_the_model_raise_and_list_both(split):
    _, _, dataset = split
    other = ClassInfo(("road", "car", "sky", "person"), CLASSES.colors)
    with pytest.raises(ValueError, match=r"(?s)model.*'tree'.*dataset.*'person'"):
        evaluate_model(NearestClass(4), CLASSES, dataset, data_classes=other)
    check_classes(CLASSES, ClassInfo(CLASSES.names, CLASSES.colors))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tta": "rotate"}, "unknown tta 'rotate'"),
        ({"sliding_window": 32}, "sliding_window=32"),
        ({"tta": "multiscale", "scales": [0.0]}, "positive scales"),
    ],
)
def test_invalid_settings_are_rejected(split, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_model(NearestClass(4), CLASSES, split[2], **kwargs)


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(NearestClass(4), CLASSES, InMemory([], []))


def test_data_key_depends_on_rows_split_and_tta_not_on_location():
    table = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "c.png"],
            "mask": ["a_m.png", "b_m.png", "c_m.png"],
            "split": ["val", "val", "train"],
        }
    )
    key = data_key(table, "val", "split01")
    assert key == data_key(table.copy(), "val", "split01")
    assert key != data_key(table, "train", "split01")
    assert key != data_key(table, "val", "split01", tta="flip")
    multiscale = data_key(table, "val", "split01", tta="multiscale", scales=(0.75, 1.0, 1.25))
    assert multiscale.endswith("|tta=multiscale,scales=0.75:1.0:1.25")
    assert multiscale != data_key(table, "val", "split01", tta="multiscale", scales=(0.7500001, 1.0, 1.25))
    assert multiscale != data_key(table, "val", "split01", tta="multiscale", scales=(0.5, 1.0))
    assert key == data_key(table, "val", "split01", scales=(0.5, 1.0))  # scales only count for multiscale
    assert key != data_key(table.assign(mask=["x.png", "b_m.png", "c_m.png"]), "val", "split01")


def test_data_key_changes_when_the_files_change_under_the_same_names(tmp_path):
    """A split rebuilt at another resolution keeps its file names: with the data root, its key changes too."""
    table = pd.DataFrame({"image": ["a.png", "b.png"], "mask": ["a_m.png", "b_m.png"], "split": ["val", "val"]})
    for name in ("a.png", "b.png", "a_m.png", "b_m.png"):
        (tmp_path / name).write_bytes(b"first build " + name.encode())
    first = data_key(table, "val", "split01", root=tmp_path)
    assert first == data_key(table, "val", "split01", root=tmp_path)
    (tmp_path / "b_m.png").write_bytes(b"second build")
    assert data_key(table, "val", "split01", root=tmp_path) != first


def test_pictures_have_the_expected_layout():
    matrix = np.array([[8, 2, 0, 0], [0, 5, 0, 0], [1, 0, 9, 0], [0, 0, 0, 0]])
    heat = render_confusion_matrix(matrix, CLASSES.names)
    assert heat.dtype == np.uint8 and heat.ndim == 3 and heat.shape[0] > 4 * 16
    bars = render_iou_bars([0.8, 0.5, math.nan, 0.9], CLASSES, miou=0.73)
    assert bars.dtype == np.uint8 and bars.shape[2] == 3
    image = np.full((64, 96, 3), 100, np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :10] = 255
    panel = render_panel(image, mask, np.ones((64, 96), np.uint8), CLASSES, title="t")
    assert panel.shape == (64 + 2 * 22, 3 * 96, 3)
    blended = overlay(image, mask, CLASSES)
    np.testing.assert_array_equal(blended[:, :10], image[:, :10])  # ignored pixels keep the image
    assert not np.array_equal(blended[:, 10:], image[:, 10:])


@pytest.mark.parametrize("entry", ["evaluate", "promote", "predict"])
def test_mlproject_params_are_cli_flags_with_the_same_defaults(repo, entry):
    import importlib

    import yaml

    from segmentation.config import EvalConfig

    spec = yaml.safe_load((repo / "MLproject").read_text())["entry_points"][entry]
    parser = importlib.import_module(f"entrypoints.{entry}").get_args_parser()
    actions = {a.dest: a for a in parser._actions}
    for name, param in spec["parameters"].items():
        assert f"--{name.replace('_', '-')} {{{name}}}" in spec["command"]
        default = param.get("default") if isinstance(param, dict) else None
        if default is not None and actions[name].type is not None and actions[name].default not in (None, ""):
            assert actions[name].type(str(default)) == actions[name].default, name
    if entry == "evaluate":
        evaluate_defaults = EvalConfig()
        for name in ("batch_size", "tta", "sliding_window", "num_worst"):
            assert spec["parameters"][name]["default"] == getattr(evaluate_defaults, name)


def test_deployed_backend_scores_like_the_module(split):
    torch.manual_seed(0)
    model = FCHarDNet(num_classes=4).eval()
    rng = np.random.default_rng(3)
    images = [torch.randn(3, 64, 128), torch.randn(3, 64, 128)]
    masks = [rng.integers(0, 4, (64, 128)).astype(np.uint8) for _ in images]
    eager = evaluate_model(model, CLASSES, InMemory(images, masks), backend="eager")
    fused = evaluate_model(model, CLASSES, InMemory(images, masks), backend="channels_last")
    onnx = evaluate_model(model, CLASSES, InMemory(images, masks), backend="onnxruntime")  # class ids in-graph
    assert fused.latency.backend == "channels_last" and eager.latency.backend == "eager"
    assert onnx.latency.backend == "onnxruntime"
    # BN folding changes logits by float rounding only (<= 1e-3), so a few near-tied pixels may flip.
    for deployed in (fused, onnx):
        assert abs(deployed.metrics["eval/pixel_acc"] - eager.metrics["eval/pixel_acc"]) < 2e-3
    with pytest.raises(ValueError, match="unknown inference backend 'tpu'"):
        evaluate_model(model, CLASSES, InMemory(images, masks), backend="tpu")
