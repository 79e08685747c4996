"""Transforms, the split-table dataset and the seeded data loader."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segmentation.config import AugmentationConfig
from segmentation.config_loading import load_config
from segmentation.data.datasets import SegmentationDataset, build_dataloader, load_split, resolve_split_table
from segmentation.data.preprocess import run_preprocess
from segmentation.data.transforms import build_train_transforms, build_val_transforms
from segmentation.models.preprocessing import normalize, to_input_tensor

ALLOWED = set(range(19)) | {255}
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    run_preprocess("synthetic", "", root, num_images=6, height=64, width=128, val_fraction=0.34)
    return root


def cfg_for(root: Path, *overrides: str):
    return load_config(TINY, [f"data.root={root}", "system.num_workers=0", *overrides])


def test_train_transforms_keep_labels_and_crop_size():
    cfg = AugmentationConfig(crop_height=48, crop_width=80, scale_min=0.5, scale_max=2.0, color_jitter=0.3)
    pipeline = build_train_transforms(cfg, seed=0)
    rng = np.random.default_rng(0)
    mask = rng.choice([0, 5, 13, 18, 255], size=(50, 70)).astype(np.uint8)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for _ in range(20):
        out = pipeline(image=image, mask=mask)
        assert out["image"].shape == (48, 80, 3) and out["mask"].shape == (48, 80)
        assert set(np.unique(out["mask"])) <= {0, 5, 13, 18, 255}


def test_padding_uses_ignore_for_mask_and_zero_for_image():
    cfg = AugmentationConfig(crop_height=40, crop_width=40, scale_min=1.0, scale_max=1.0, hflip_prob=0.0)
    out = build_train_transforms(cfg, ignore_index=255, seed=0)(
        image=np.full((10, 20, 3), 200, np.uint8), mask=np.full((10, 20), 3, np.uint8)
    )
    assert (out["mask"] == 3).sum() == 200 and (out["mask"] == 255).sum() == 40 * 40 - 200
    assert (out["image"][out["mask"] == 255] == 0).all() and (out["image"][out["mask"] == 3] == 200).all()


def test_val_resize_is_nearest_for_masks():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 13
    mask[0, 0] = 255
    out = build_val_transforms(AugmentationConfig(val_height=13, val_width=11))(
        image=np.zeros((8, 8, 3), np.uint8), mask=mask
    )
    assert out["mask"].shape == (13, 11) and set(np.unique(out["mask"])) == {0, 13, 255}
    same = build_val_transforms(AugmentationConfig())(image=np.zeros((8, 8, 3), np.uint8), mask=mask)
    assert np.array_equal(same["mask"], mask)


def test_dataset_items_follow_the_model_contract(synthetic_root):
    table, classes, root = load_split(synthetic_root)
    assert classes.num_classes == 19 and root == synthetic_root
    dataset = SegmentationDataset(table, "val", None, root)
    image, mask = dataset[0]
    raw_image, raw_mask = dataset.read_raw(0)
    assert image.dtype == torch.float32 and image.shape == (3, 64, 128)
    assert mask.dtype == torch.int64 and mask.shape == (64, 128)
    assert torch.allclose(image, torch.from_numpy(normalize(raw_image).transpose(2, 0, 1)))  # BGR kept
    assert set(mask.unique().tolist()) <= ALLOWED and np.array_equal(mask.numpy(), raw_mask)


def test_inference_input_is_the_training_input_bit_for_bit():
    # Training normalises with normalize(); inference builds its tensor its own (faster) way: the values must match.
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for view in (image, image[::-1, ::2]):  # a contiguous image and a strided view of it
        expected = np.ascontiguousarray(normalize(view).transpose(2, 0, 1))[None]
        got = to_input_tensor(view)
        assert got.dtype == torch.float32 and got.is_contiguous() and np.array_equal(got.numpy(), expected)
    with pytest.raises(ValueError, match="H x W x 3"):
        to_input_tensor(image[..., :2])


def batches(loader, n=2):
    return [tuple(t.clone() for t in batch) for _, batch in zip(range(n), loader, strict=False)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_is_deterministic(synthetic_root, num_workers):
    cfg = cfg_for(synthetic_root, f"system.num_workers={num_workers}")
    first = batches(build_dataloader(cfg, "train", train=True, batch_size=2))
    second = batches(build_dataloader(cfg, "train", train=True, batch_size=2))
    assert all(torch.equal(a, b) for x, y in zip(first, second, strict=True) for a, b in zip(x, y, strict=True))
    other = batches(
        build_dataloader(
            cfg_for(synthetic_root, f"system.num_workers={num_workers}", "system.seed=7"),
            "train",
            train=True,
            batch_size=2,
        )
    )
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(first, other, strict=True))
    for images, masks in first:
        assert images.shape == (2, 3, 64, 128) and set(masks.unique().tolist()) <= ALLOWED


def test_loader_options(synthetic_root):
    cfg = cfg_for(synthetic_root)
    train = build_dataloader(cfg, "train", train=True, batch_size=3)
    assert train.drop_last and not train.persistent_workers and not train.pin_memory
    val = build_dataloader(cfg, "val", train=False)
    assert not val.drop_last and val.batch_size == cfg.eval.batch_size
    assert build_dataloader(cfg, "train", train=True, num_workers=1).persistent_workers
    with pytest.raises(ValueError, match="model.num_classes=19"):
        build_dataloader(cfg_for(synthetic_root, "model.num_classes=3"), "train", train=True)


def test_missing_table_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="entrypoints.preprocess"):
        resolve_split_table(tmp_path)
    with pytest.raises(ValueError, match="split 'test' has no rows"):
        SegmentationDataset(load_split(_copy(tmp_path))[0], "test", None, tmp_path)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    run_preprocess("synthetic", "", root, num_images=2, height=32, width=32)
    return root


@pytest.mark.parametrize("case", ["missing", "corrupt", "size", "values"])
def test_bad_files_raise_with_their_name(tmp_path, case):
    root = _copy(tmp_path)
    table, _, _ = load_split(root)
    dataset = SegmentationDataset(table, "train", None, root)
    image, mask = dataset.images[0], dataset.masks[0]
    if case == "missing":
        image.unlink()
        error, name = FileNotFoundError, image.name
    elif case == "corrupt":
        image.write_bytes(b"not an image at all" + b"IEND\xaeB`\x82")
        error, name = ValueError, image.name
    elif case == "size":
        cv2.imwrite(str(mask), np.zeros((16, 32), np.uint8))
        error, name = ValueError, mask.name
    else:
        cv2.imwrite(str(mask), np.full((32, 32), 19, np.uint8))
        error, name = ValueError, rf"{mask.name}: label values \[19\]"
    with pytest.raises(error, match=name):
        dataset[0]
