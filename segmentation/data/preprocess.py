"""The preprocess step: a Cityscapes tree, a CVAT export or the synthetic generator -> masks and a split table.

Output (the same for every dataset)::

    out_dir/split/<split_id>.parquet       one row per sample: image, mask, color (relative to out_dir), split,
                                           subset, city, height, width, labeled
    out_dir/split/<split_id>.stats.json    samples and pixels per class and split, and a content digest
    out_dir/split/classes.csv              id,name,r,g,b (+ the ignore row 255);  split/colormap.npy: C x 3 uint8
    out_dir/images/<key>.<ext>             the images (hard links to the source when possible, else copies)
    out_dir/interim/gt/<key>.png           1-channel train-id masks, 255 = ignore
    out_dir/interim/color/<key>.png        colourised masks

Everything is built in a staging folder inside ``out_dir`` and moved into place only after every sample has
been read and checked, so a bad input leaves ``out_dir`` as it was. Re-running with the same inputs writes
byte-identical files. ``out_dir`` holds one dataset: tables of several ``split_id`` values share its files, so a run
that would change a file another table uses (another dataset, other classes) is refused (see :mod:`.publish`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from segmentation.data.cityscapes import iter_cityscapes
from segmentation.data.classes import IGNORE_INDEX, ClassInfo, colorize
from segmentation.data.cvat import read_cvat
from segmentation.data.publish import STAGING_PREFIX, check_other_tables, check_output_paths, image_suffix, publish
from segmentation.data.samples import RawSample, check_mask, seeded_split
from segmentation.data.synthetic import generate_scene
from segmentation.io import write_text_atomic

DATASETS = ("synthetic", "cityscapes", "cvat")
# The step's settings a dataset does not read (every entry point has one fixed parameter list): Cityscapes has its
# official splits; only the generator has a size. CVAT reads val_fraction and seed for images without a subset.
UNREAD_SETTINGS = {
    "synthetic": ("raw_dir",),
    "cityscapes": ("val_fraction", "seed", "num_images", "height", "width"),
    "cvat": ("num_images", "height", "width"),
}
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
COLUMNS = ["image", "mask", "color", "split", "subset", "city", "height", "width", "labeled"]


def split_table_path(out_dir: str | Path, split_id: str) -> Path:
    return Path(out_dir) / "split" / f"{split_id}.parquet"


@lru_cache(maxsize=1)  # image and mask of a sample are asked for one after the other: draw the scene once
def _scene(height: int, width: int, seed: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return generate_scene(height, width, seed)


def synthetic_samples(num_images: int, height: int, width: int, val_fraction: float, seed: int) -> list[RawSample]:
    """``num_images`` generated street scenes; image ``i`` depends only on ``(seed, i)`` and its size."""
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (one train and one val image), got {num_images}")
    keys = [f"synthetic_{i:05d}" for i in range(num_images)]
    splits = seeded_split(keys, val_fraction, seed)
    samples = []
    for i, key in enumerate(keys):
        scene = partial(_scene, height, width, (seed, i))
        samples.append(
            RawSample(
                key=key,
                split=splits[key],
                load_image=lambda s=scene: s()[0],
                build_mask=lambda s=scene: s()[1],
                subset="synthetic",
            )
        )
    return samples


def _check_inputs(dataset: str, raw_dir: str | Path, out_dir: Path, split_id: str) -> Path | None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split_id):
        raise ValueError(f"split_id {split_id!r} must be a plain file name (letters, digits, '_', '.', '-')")
    if dataset == "synthetic":
        if str(raw_dir):
            raise ValueError(f"raw_dir {raw_dir} is not read by dataset='synthetic' (generated); leave raw_dir empty")
        return None
    if not str(raw_dir):
        raise ValueError(f"raw_dir is required for dataset={dataset!r} (the folder holding the export)")
    raw = Path(raw_dir).resolve()
    if not raw.is_dir():
        raise FileNotFoundError(f"raw_dir {raw_dir} does not exist or is not a folder")
    if not any(raw.iterdir()):
        raise ValueError(f"raw_dir {raw_dir} is empty; expected a {dataset} export in it")
    out = out_dir.resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise ValueError(f"out_dir {out_dir} and raw_dir {raw_dir} overlap; write the output to a separate folder")
    return raw


def _encode_png(array: np.ndarray, name: str) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{name}: OpenCV could not encode the PNG")
    return buf.tobytes()


def _write_sample(sample: RawSample, classes: ClassInfo, staging: Path, digest) -> tuple[dict, np.ndarray]:
    name = str(sample.source or sample.key)
    image = sample.load_image()
    mask = sample.build_mask()
    check_mask(mask, classes.num_classes, name, image.shape)
    image_rel = f"images/{sample.key}{image_suffix(sample)}"
    target = staging / image_rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if sample.source is None:
        target.write_bytes(_encode_png(image, name))
    else:
        try:
            os.link(sample.source, target)
        except OSError:  # another filesystem, or links not allowed: copy instead
            shutil.copyfile(sample.source, target)
    outputs = {
        "mask": (f"interim/gt/{sample.key}.png", mask),
        "color": (f"interim/color/{sample.key}.png", colorize(mask, classes)[..., ::-1]),
    }
    digest.update(sample.key.encode() + hashlib.sha256(target.read_bytes()).digest())
    for rel, array in outputs.values():
        data = _encode_png(array, name)
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
        digest.update(hashlib.sha256(data).digest())
    row = {
        "image": image_rel,
        "mask": outputs["mask"][0],
        "color": outputs["color"][0],
        "split": sample.split,
        "subset": sample.subset,
        "city": sample.city,
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "labeled": sample.labeled,
    }
    return row, np.bincount(mask.ravel(), minlength=256)


def run_preprocess(
    dataset: str,
    raw_dir: str | Path,
    out_dir: str | Path,
    split_id: str = "split01",
    val_fraction: float = 0.2,
    seed: int = 0,
    num_images: int = 200,
    height: int = 128,
    width: int = 256,
) -> Path:
    """Convert a dataset into masks and a split table under ``out_dir`` (see the module docstring).

    Args:
        dataset: ``synthetic`` (generated; ``raw_dir`` unused), ``cityscapes`` or ``cvat``.
        raw_dir: the source folder (Cityscapes: holds ``leftImg8bit/`` and ``gtFine/``; CVAT: ``cvat/``, ``images/``).
        out_dir: output folder, created if needed; must not overlap ``raw_dir``.
        split_id: name of the split table (``split/<split_id>.parquet``).
        val_fraction: share of validation samples where the source defines no split (synthetic; CVAT without
            subsets).
        seed: seed of that split and of the synthetic generator.
        num_images: synthetic only, number of images.
        height: synthetic only, image height in pixels.
        width: synthetic only, image width in pixels.

    Returns:
        The path of the split table.

    Raises:
        ValueError, FileNotFoundError: bad arguments or bad input, output paths that clash, or ``out_dir`` holding
            a table of another ``split_id`` whose files this run would change; the message names the file and the
            problem. ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    raw = _check_inputs(dataset, raw_dir, out_dir, split_id)
    if dataset == "synthetic":
        classes, samples = ClassInfo.cityscapes(), synthetic_samples(num_images, height, width, val_fraction, seed)
    elif dataset == "cityscapes":
        classes, samples = ClassInfo.cityscapes(), list(iter_cityscapes(raw))
    else:
        classes, samples = read_cvat(raw, val_fraction, seed)
    check_output_paths(samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):  # left behind by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        samples.sort(key=lambda s: (SPLIT_ORDER.get(s.split, 3), s.key))
        digest, rows, pixels = hashlib.sha256(), [], {}
        for sample in tqdm(samples, desc=f"preprocess {dataset}", unit="image", mininterval=2.0):
            row, counts = _write_sample(sample, classes, staging, digest)
            rows.append(row)
            pixels[sample.split] = pixels.get(sample.split, 0) + counts
        table = pd.DataFrame(rows, columns=COLUMNS)
        (staging / "split").mkdir()
        table.to_parquet(staging / "split" / f"{split_id}.parquet", index=False)
        classes.write_csv(staging / "split" / "classes.csv")
        np.save(staging / "split" / "colormap.npy", classes.colormap)
        stats = {
            "dataset": dataset,
            "split_id": split_id,
            "digest": digest.hexdigest(),
            "num_samples": table["split"].value_counts().sort_index().to_dict(),
            "pixels": {
                split: {name: int(c[i]) for i, name in enumerate(classes.names)} for split, c in sorted(pixels.items())
            },
            "ignore_pixels": {split: int(c[IGNORE_INDEX]) for split, c in sorted(pixels.items())},
        }
        write_text_atomic(staging / "split" / f"{split_id}.stats.json", json.dumps(stats, indent=2) + "\n")
        check_other_tables(staging, out_dir, split_id)
        publish(staging, out_dir, split_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return split_table_path(out_dir, split_id)
