"""Read a Cityscapes tree (``leftImg8bit/`` + ``gtFine/``) as it is released.

Each ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` is paired with ``gtFine/<split>/<city>/<stem>_gtFine_*``:

1. ``*_gtFine_labelIds.png`` when present, mapped to train ids with the official table
   (:mod:`segmentation.data.cityscapes_labels`; 19 classes, everything else 255);
2. otherwise ``*_gtFine_polygons.json``, rasterised as cityscapesScripts' ``json2labelImg`` does: background
   ``unlabeled`` (id 0), objects drawn in file order (later on top), ``deleted`` objects skipped, ``<name>group``
   mapped to ``<name>`` when ``<name>group`` itself is not a label, labels with a negative id skipped;
3. otherwise, for the ``test`` split only, the image is listed with an all-ignore (255) mask and ``labeled=False``
   (the public test labels are withheld). A ``train``/``val`` image without labels is an error.

Missing splits are fine (a tree with only ``val`` is accepted); a tree without any image is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from segmentation.data.cityscapes_labels import MAX_LABEL_ID, NAME_TO_ID, id_to_train_id_lut
from segmentation.data.classes import IGNORE_INDEX
from segmentation.data.samples import RawSample, read_image, read_label_png

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"


def label_ids_to_train_ids(label_ids: np.ndarray, name: str | Path = "labelIds") -> np.ndarray:
    """Map a Cityscapes ``labelIds`` image to train ids (0-18, 255 = ignore).

    Raises:
        ValueError: the image holds ids that the official table does not define (> 33).
    """
    bad = np.unique(label_ids[label_ids > MAX_LABEL_ID])
    if bad.size:
        raise ValueError(f"{name}: label ids {bad.tolist()[:10]} are not Cityscapes label ids (0..{MAX_LABEL_ID})")
    return id_to_train_id_lut()[label_ids]


def rasterize_polygons(annotation: dict, name: str | Path = "polygons") -> np.ndarray:
    """Draw a ``*_gtFine_polygons.json`` annotation into an ``H x W`` uint8 image of Cityscapes label ids.

    Raises:
        ValueError: a field is missing or an object names a label that the official table does not know.
    """
    try:
        height, width = int(annotation["imgHeight"]), int(annotation["imgWidth"])
        objects = annotation["objects"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected keys imgHeight, imgWidth and objects ({exc!r})") from None
    label_ids = np.full((height, width), NAME_TO_ID["unlabeled"], dtype=np.uint8)
    for index, obj in enumerate(objects):
        if obj.get("deleted"):
            continue
        label = obj.get("label", "")
        # Crowd regions are annotated as e.g. "cargroup"; the official tool draws them with the base label.
        if label not in NAME_TO_ID and label.endswith("group"):
            label = label[: -len("group")]
        if label not in NAME_TO_ID:
            raise ValueError(f"{name}: object {index} has unknown label {obj.get('label')!r}")
        label_id = NAME_TO_ID[label]
        if label_id < 0:  # license plate: not part of the label images
            continue
        points = np.rint(np.asarray(obj.get("polygon", []), dtype=np.float64)).astype(np.int32)
        if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] != 2:
            raise ValueError(f"{name}: object {index} ({label}) needs a polygon of >= 3 [x, y] points")
        cv2.fillPoly(label_ids, [points], int(label_id))
    return label_ids


def _mask_from_label_ids(path: Path) -> np.ndarray:
    return label_ids_to_train_ids(read_label_png(path), path)


def _mask_from_polygons(path: Path) -> np.ndarray:
    try:
        annotation = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return label_ids_to_train_ids(rasterize_polygons(annotation, path), path)


def _empty_mask(image_path: Path) -> np.ndarray:
    height, width = read_image(image_path).shape[:2]
    return np.full((height, width), IGNORE_INDEX, dtype=np.uint8)


def iter_cityscapes(raw_dir: str | Path) -> Iterator[RawSample]:
    """Yield one :class:`RawSample` per ``leftImg8bit`` image, in split, city, file-name order.

    Raises:
        FileNotFoundError: ``raw_dir`` has no ``leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png``, or a
            train/val image has neither a labelIds PNG nor a polygons JSON.
    """
    raw_dir = Path(raw_dir)
    images = sorted((split, path) for split in SPLITS
                    for path in (raw_dir / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise FileNotFoundError(
            f"{raw_dir}: no Cityscapes images found; expected leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} "
            f"with split in {', '.join(SPLITS)}"
        )
    for split, image_path in images:
        city = image_path.parent.name
        stem = image_path.name[: -len(IMAGE_SUFFIX)]
        gt_dir = raw_dir / "gtFine" / split / city
        label_ids = gt_dir / f"{stem}_gtFine_labelIds.png"
        polygons = gt_dir / f"{stem}_gtFine_polygons.json"
        labeled = True
        if label_ids.is_file():
            build = partial(_mask_from_label_ids, label_ids)
        elif polygons.is_file():
            build = partial(_mask_from_polygons, polygons)
        elif split == "test":
            build, labeled = partial(_empty_mask, image_path), False
        else:
            raise FileNotFoundError(f"{image_path}: no labels found (looked for {label_ids} and {polygons})")
        yield RawSample(key=f"{split}/{city}/{stem}", split=split, load_image=partial(read_image, image_path),
                        build_mask=build, source=image_path, subset=split, city=city, labeled=labeled)
