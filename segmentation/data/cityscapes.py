"""Read a Cityscapes tree (``leftImg8bit/`` + ``gtFine/``) as it is released.

Each ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` is paired with ``gtFine/<split>/<city>/<stem>_gtFine_*``:

1. ``*_gtFine_labelIds.png`` when present, mapped to train ids with the official table
   (:mod:`segmentation.data.cityscapes_labels`; 19 classes, everything else 255). Its size, read from its PNG
   header, must equal the image's before it is decoded;
2. otherwise ``*_gtFine_polygons.json``, rasterised as cityscapesScripts' ``json2labelImg`` does: background
   ``unlabeled`` (id 0), objects drawn in file order (later on top), ``deleted`` objects skipped, ``<name>group``
   mapped to ``<name>`` when ``<name>group`` itself is not a label, labels with a negative id skipped. The declared
   ``imgWidth``/``imgHeight`` must equal the image's size, read from its header before the label image is allocated;
3. otherwise, for the ``test`` split only, the image is listed with an all-ignore (255) mask and ``labeled=False``
   (the public test labels are withheld). A ``train``/``val`` image without labels is an error.

Missing splits are fine (a tree with only ``val`` is accepted); a tree without any image is an error.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from segmentation.data.cityscapes_labels import MAX_LABEL_ID, NAME_TO_ID, id_to_train_id_lut
from segmentation.data.classes import IGNORE_INDEX
from segmentation.data.image_header import MAX_PIXELS, read_image_header, read_image_size
from segmentation.data.samples import RawSample, check_near_image, read_image, read_label_png

MAX_POLYGONS_BYTES = 64 << 20  # a gtFine polygons JSON is read whole; the dataset's largest is a few hundred KB

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


# Bounded in depth and length: hostile JSON may nest arrays hundreds deep or hold integers of thousands of digits.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxlong = 3, 4, 4, 40, 40


def _excerpt(value: object) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_int(annotation: dict, key: str, name: str | Path) -> int:
    value = annotation.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name}: {key} must be a positive integer (the image size in pixels), found {_excerpt(value)}"
        )
    return value


def _polygon(obj: dict, index: int, label: str, height: int, width: int, name: str | Path) -> np.ndarray:
    """The object's polygon as an ``N x 2`` int32 array, checked before OpenCV sees it."""
    where = f"{name}: object {index} ({label!r}): field 'polygon'"
    polygon = obj.get("polygon")
    if not isinstance(polygon, list) or len(polygon) < 3:
        raise ValueError(f"{where} must be a list of >= 3 [x, y] points, found {_excerpt(polygon)}")
    for point in polygon:
        if not (
            isinstance(point, list)
            and len(point) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
        ):
            raise ValueError(f"{where}: every point must be a list of two numbers [x, y], found {_excerpt(point)}")
    try:
        points = np.asarray(polygon, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range, e.g. 10**400; the largest one is such an integer
        largest = max((v for point in polygon for v in point), key=abs)
        raise ValueError(
            f"{where}: coordinate {_excerpt(largest)} is beyond float64's range; coordinates are pixel positions "
            f"on or near the {width}x{height} (W x H) image"
        ) from None
    check_near_image(points, height, width, where)
    return np.rint(points).astype(np.int32)


def rasterize_polygons(
    annotation: dict, name: str | Path = "polygons", image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Draw a ``*_gtFine_polygons.json`` annotation into an ``H x W`` uint8 image of Cityscapes label ids.

    Args:
        annotation: the parsed JSON (``imgHeight``, ``imgWidth``, ``objects``).
        name: the file, named in error messages.
        image_size: ``(height, width)`` of the real image; when given, the declared size must equal it. It is
            compared before anything of the declared size is allocated.

    Raises:
        ValueError: a field is missing or has the wrong type, the declared size differs from ``image_size``, a
            polygon lies far outside the image, or an object names a label that the official table does not know.
            The message names the file, the object index and the field.
    """
    if not isinstance(annotation, dict):
        raise ValueError(
            f"{name}: expected a JSON object with imgHeight, imgWidth and objects, found {type(annotation).__name__}"
        )
    height, width = _positive_int(annotation, "imgHeight", name), _positive_int(annotation, "imgWidth", name)
    if image_size is not None and (height, width) != tuple(image_size):
        raise ValueError(
            f"{name}: declared imgWidth x imgHeight = {_excerpt(width)}x{_excerpt(height)} but the image is "
            f"{image_size[1]}x{image_size[0]} (W x H); the polygons must declare the image's size"
        )
    if height * width > MAX_PIXELS:
        raise ValueError(
            f"{name}: declared imgWidth x imgHeight = {width}x{height} exceeds the {MAX_PIXELS} pixels "
            "allowed (OpenCV's image limit)"
        )
    objects = annotation.get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"{name}: field 'objects' must be a list of objects, found {_excerpt(objects)}")
    label_ids = np.full((height, width), NAME_TO_ID["unlabeled"], dtype=np.uint8)
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise ValueError(
                f"{name}: object {index} must be a JSON object with label and polygon, found {_excerpt(obj)}"
            )
        if obj.get("deleted"):
            continue
        label = obj.get("label")
        if not isinstance(label, str):
            raise ValueError(f"{name}: object {index}: field 'label' must be a string, found {_excerpt(label)}")
        # Crowd regions are annotated as e.g. "cargroup"; the official tool draws them with the base label.
        if label not in NAME_TO_ID and label.endswith("group"):
            label = label[: -len("group")]
        if label not in NAME_TO_ID:
            raise ValueError(f"{name}: object {index} has unknown label {obj.get('label')!r}")
        label_id = NAME_TO_ID[label]
        if label_id < 0:  # license plate: not part of the label images
            continue
        cv2.fillPoly(label_ids, [_polygon(obj, index, label, height, width, name)], int(label_id))
    return label_ids


def _mask_from_label_ids(path: Path, image_path: Path) -> np.ndarray:
    # Compared from the headers before the label image is decoded: a small PNG can declare gigapixels.
    header, image_size = read_image_header(path), read_image_size(image_path)
    if header is None:
        raise ValueError(f"{path}: not a PNG image; a labelIds image is a single-channel 8-bit PNG")
    if (header.height, header.width) != image_size:
        raise ValueError(
            f"{path}: label image is {header.width}x{header.height} (W x H, from its header) but {image_path} is "
            f"{image_size[1]}x{image_size[0]}; a labelIds image must have its image's size"
        )
    return label_ids_to_train_ids(read_label_png(path), path)


def _mask_from_polygons(path: Path, image_path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size > MAX_POLYGONS_BYTES:
        raise ValueError(
            f"{path}: {size} bytes, above the {MAX_POLYGONS_BYTES} bytes a polygons file may have (Cityscapes' "
            "own are below 1 MB); not read"
        )
    try:
        annotation = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(
            f"{path}: not a Cityscapes polygons file (JSON nested deeper than the parser allows; the format nests "
            "5 levels)"
        ) from None
    return label_ids_to_train_ids(rasterize_polygons(annotation, path, read_image_size(image_path)), path)


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
    images = sorted(
        (split, path) for split in SPLITS for path in (raw_dir / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")
    )
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
            build = partial(_mask_from_label_ids, label_ids, image_path)
        elif polygons.is_file():
            build = partial(_mask_from_polygons, polygons, image_path)
        elif split == "test":
            build, labeled = partial(_empty_mask, image_path), False
        else:
            raise FileNotFoundError(f"{image_path}: no labels found (looked for {label_ids} and {polygons})")
        yield RawSample(
            key=f"{split}/{city}/{stem}",
            split=split,
            load_image=partial(read_image, image_path),
            build_mask=build,
            source=image_path,
            subset=split,
            city=city,
            labeled=labeled,
        )
