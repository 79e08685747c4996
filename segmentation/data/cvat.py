"""Read CVAT exports: "CVAT for images 1.1" (task and project exports) and "CVAT for video 1.1" (tracks).

Layout under ``raw_dir``: annotation XML files in ``cvat/`` (``*.xml``) and images in ``images/`` (``images/<name>``
or ``images/<subset>/<name>``; for videos ``images/frame_000000.<ext>``, as CVAT's "with images" export writes).

* Classes: background is 0, then the labels declared in ``meta/project/labels``, ``meta/task/labels`` or
  ``meta/job/labels`` in declared order; a declared label named ``background`` is class 0. Colours come from
  the labels' ``<color>`` when present, otherwise from a fixed palette. At most 254 labels besides background:
  masks are 8-bit and 255 is the ignore index.
* Samples are keyed by subset + image name, so project exports that repeat names across subsets stay distinct.
* Splits: a subset named train/training -> ``train``, val/valid/validation -> ``val``, test/testing -> ``test``
  (case-insensitive); images without a subset (or subset ``default``) get a seeded ``val_fraction`` split;
  any other subset name is an error.
* Sizes: the declared size (``<image width height>``, or ``meta/.../original_size`` for videos) must equal the
  image's as displayed (EXIF orientation applied, as CVAT shows it and OpenCV decodes it), read from its header
  before any mask is allocated; a ``<mask>`` box must lie inside the image.
* XML is parsed with ``defusedxml``: DTD entities and external references are refused.

The XML elements are read by :mod:`.cvat_xml`; the shapes are rasterised by :mod:`.cvat_shapes`.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from functools import partial
from pathlib import Path
from xml.etree.ElementTree import Element

from segmentation.data.classes import ClassInfo
from segmentation.data.cvat_shapes import AREA_SHAPES, TrackShape, rasterize, shape_at
from segmentation.data.cvat_xml import (
    build_classes,
    check_label,
    declared_size,
    int_attr,
    parse_labels,
    parse_shape,
    parse_xml,
    required_attr,
)
from segmentation.data.image_header import read_image_size
from segmentation.data.samples import RawSample, read_image, seeded_split

logger = logging.getLogger(__name__)

SUBSET_TO_SPLIT = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
UNSPLIT_SUBSETS = ("", "default")
_SHAPE_TAGS = (*AREA_SHAPES, "polyline", "points", "skeleton", "tag", "cuboid")
_FRAME_NAME = re.compile(r"frame_([0-9]+)\.")  # what CVAT's "with images" video export writes, any extension


def _check_image_size(image: Path, size: tuple[int, int], where: str) -> None:
    """Refuse a declared ``(height, width)`` that differs from the image's header, before any mask is allocated."""
    real = read_image_size(image)
    if real != size:
        raise ValueError(
            f"{where}: declared width x height = {size[1]}x{size[0]} but {image} is {real[1]}x{real[0]} "
            "(W x H, from its header); the declared size must be the image's size"
        )


def _inside(path: Path, raw_dir: Path, where: str) -> Path:
    """``path``, once it is known to resolve inside ``raw_dir``: a symlink must not pull in files from elsewhere."""
    resolved = path.resolve()
    if not resolved.is_relative_to(raw_dir.resolve()):
        raise ValueError(
            f"{where}{path} resolves to {resolved}, outside raw_dir {raw_dir}; the files of an export "
            "(and the targets of symlinks in it) must lie inside raw_dir"
        )
    return path


def _image_path(raw_dir: Path, subset: str, name: str, xml: Path) -> Path:
    images_dir = raw_dir / "images"
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(f"{xml}: image name {name!r} escapes {images_dir}; names must be relative, without '..'")
    candidates = ([images_dir / subset / name] if subset else []) + [images_dir / name]
    for candidate in candidates:
        if candidate.is_file():
            return _inside(candidate, raw_dir, f"{xml}: image {name!r}: ")
    raise FileNotFoundError(
        f"{xml}: image {name!r} (subset {subset!r}) is listed but missing on disk; looked "
        f"for {', '.join(str(c) for c in candidates)}"
    )


def _frame_images(raw_dir: Path) -> dict[int, Path]:
    """``{frame: images/frame_<frame:06d>.<ext>}`` from one listing of ``images/`` (the first name where several
    extensions exist)."""
    images_dir, found = raw_dir / "images", {}
    if not images_dir.is_dir():
        return {}
    for name in sorted(os.listdir(images_dir)):
        match = _FRAME_NAME.match(name)
        if match and f"{int(match[1]):06d}" == match[1]:
            found.setdefault(int(match[1]), images_dir / name)
    return found


def _frame_image(images: dict[int, Path], raw_dir: Path, frame: int, xml: Path) -> Path:
    if frame not in images:
        raise FileNotFoundError(f"{xml}: frame {frame} has no image {raw_dir / 'images'}/frame_{frame:06d}.<ext>")
    return _inside(images[frame], raw_dir, f"{xml}: frame {frame}: ")


def _frames(root: Element, xml: Path, raw_dir: Path, declared: set[str], skipped: Counter) -> list[dict]:
    """Frames of one XML file: ``{name, subset, image, height, width, shapes}`` dicts in document order."""
    task_subsets = {t.findtext("id"): (t.findtext("subset") or "") for t in root.findall("meta/project/tasks/task")}
    default_subset = root.findtext("meta/task/subset") or ""
    frames, order = [], 0
    for index, image in enumerate(root.iter("image")):
        name = required_attr(image, "name", f"{xml}: <image> element {index} (id {image.attrib.get('id')!r})")
        where = f"image {name!r}"
        subset = image.attrib.get("subset", task_subsets.get(image.attrib.get("task_id"), default_subset))
        image_size = declared_size(image.attrib.get("width"), image.attrib.get("height"), f"{xml}: {where}")
        path = _image_path(raw_dir, subset, name, xml)
        _check_image_size(path, image_size, f"{xml}: {where}")
        shapes = []
        for element in image:
            if element.tag not in _SHAPE_TAGS:
                continue
            check_label(element, declared, xml, where)
            if element.tag in AREA_SHAPES:
                shapes.append(parse_shape(element, order, f"{xml}: {where}", image_size))
            else:
                skipped[element.tag] += 1
            order += 1
        frames.append(
            {
                "name": name,
                "subset": subset,
                "image": path,
                "height": image_size[0],
                "width": image_size[1],
                "shapes": shapes,
            }
        )
    tracks = root.findall("track")
    if not tracks:
        return frames
    if frames:
        raise ValueError(f"{xml}: mixes <image> and <track> elements; expected one CVAT 1.1 layout")
    size = root.findtext("meta/task/size") or root.findtext("meta/job/size")
    height = root.findtext("meta/task/original_size/height") or root.findtext("meta/job/original_size/height")
    width = root.findtext("meta/task/original_size/width") or root.findtext("meta/job/original_size/width")
    if not (height and width):
        raise ValueError(f"{xml}: a video export must declare meta/task/original_size/width and height")
    image_size = declared_size(width, height, f"{xml}: meta original_size")
    # Frame numbers only bound the loop below, which stops at the first frame without an image.
    num_frames = int_attr(size, "meta size (frame count)", str(xml), 0, 10**9) if size else None
    parsed = []
    for index, track in enumerate(tracks):
        where = f"track {required_attr(track, 'id', f'{xml}: <track> element {index}')!r}"
        label, states = required_attr(track, "label", f"{xml}: {where}"), []
        for element in track:
            element.attrib.setdefault("label", label)
            check_label(element, declared, xml, where)
            if element.tag not in AREA_SHAPES:
                skipped[element.tag] += 1
                continue
            shape_where = f"{xml}: {where}: {element.tag} {element.attrib['label']!r}"
            frame = int_attr(element.attrib.get("frame"), "frame", shape_where, 0, 10**9)
            outside = element.attrib.get("outside", "0")  # CVAT always writes it; absent means visible
            if outside not in ("0", "1"):
                raise ValueError(f"{shape_where}: attribute outside={outside!r} must be 0 or 1")
            shape = parse_shape(element, order, f"{xml}: {where}", image_size)
            states.append(TrackShape(frame, outside == "1", shape))
            order += 1
        parsed.append(sorted(states, key=lambda s: s.frame))  # shape_at expects frame order
    last = max((s.frame for states in parsed for s in states), default=-1)
    images = _frame_images(raw_dir)
    for frame in range(last + 1 if num_frames is None else num_frames):
        shapes = [s for states in parsed if (s := shape_at(states, frame)) is not None]
        path = _frame_image(images, raw_dir, frame, xml)
        _check_image_size(path, image_size, f"{xml}: frame {frame} (meta original_size)")
        frames.append(
            {
                "name": f"frame_{frame:06d}",
                "subset": default_subset,
                "image": path,
                "height": image_size[0],
                "width": image_size[1],
                "shapes": shapes,
            }
        )
    return frames


def read_cvat(raw_dir: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[ClassInfo, list[RawSample]]:
    """Parse every ``raw_dir/cvat/*.xml`` and return the class table and one sample per image or video frame.

    Raises:
        FileNotFoundError: no XML, or an image listed in the XML is missing.
        ValueError: malformed or unsafe XML, undeclared labels, bad geometry, declared sizes that differ from the
            image, names escaping ``raw_dir``, files (XML or images) resolving outside ``raw_dir`` through symlinks,
            unknown subset names; each message names the XML file.
    """
    raw_dir = Path(raw_dir)
    xml_files = sorted((raw_dir / "cvat").glob("*.xml"))
    if not xml_files:
        raise FileNotFoundError(f"{raw_dir}: no CVAT export found; expected XML files in {raw_dir / 'cvat'}")
    roots = [(xml, parse_xml(_inside(xml, raw_dir, ""))) for xml in xml_files]
    labels: dict[str, tuple[int, int, int] | None] = {}
    for xml, root in roots:
        for name, rgb in parse_labels(root, xml).items():
            labels.setdefault(name, rgb)  # the first file declaring a label gives its colour
    classes = build_classes(labels, ", ".join(str(xml) for xml in xml_files))
    class_ids = {name: index for index, name in enumerate(classes.names)}
    label_ids = {name: class_ids.get(name, 0) for name in labels}  # "background" in any case is class 0
    skipped: Counter = Counter()
    frames = [(xml, f) for xml, root in roots for f in _frames(root, xml, raw_dir, set(label_ids), skipped)]
    if skipped:
        logger.info("CVAT: skipped shapes without an area: %s", dict(sorted(skipped.items())))
    keyed = {}
    for xml, frame in frames:
        subset = frame["subset"].strip()
        if subset.lower() not in UNSPLIT_SUBSETS and subset.lower() not in SUBSET_TO_SPLIT:
            raise ValueError(
                f"{xml}: subset {subset!r} of image {frame['name']!r} is not a known split name; "
                f"use one of {sorted(SUBSET_TO_SPLIT)} (any case), or no subset for a seeded split"
            )
        key = f"{subset or 'default'}/{Path(frame['name']).with_suffix('')}"
        if key in keyed:
            raise ValueError(f"{xml}: image {frame['name']!r} appears twice in subset {subset!r}")
        keyed[key] = (xml, frame)
    unsplit = [k for k, (_, f) in keyed.items() if f["subset"].strip().lower() in UNSPLIT_SUBSETS]
    splits = seeded_split(unsplit, val_fraction, seed)
    samples = []
    for key, (xml, frame) in keyed.items():
        build = partial(
            rasterize, frame["shapes"], frame["height"], frame["width"], label_ids, f"{xml}: image {frame['name']!r}"
        )
        split = splits.get(key) or SUBSET_TO_SPLIT[frame["subset"].strip().lower()]
        samples.append(
            RawSample(
                key=key,
                split=split,
                load_image=partial(read_image, frame["image"]),
                build_mask=build,
                source=frame["image"],
                subset=frame["subset"],
            )
        )
    return classes, samples
