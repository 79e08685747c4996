"""Read CVAT exports: "CVAT for images 1.1" (task and project exports) and "CVAT for video 1.1" (tracks).

Layout under ``raw_dir``: annotation XML files in ``cvat/`` (``*.xml``) and images in ``images/`` (``images/<name>``
or ``images/<subset>/<name>``; for videos ``images/frame_000000.<ext>``, as CVAT's "with images" export writes).

* Classes: background is 0, then the labels declared in ``meta/project/labels``, ``meta/task/labels`` or
  ``meta/job/labels`` in declared order; a declared label named ``background`` is class 0. Colours come from
  the labels' ``<color>`` when present, otherwise from a fixed palette.
* Samples are keyed by subset + image name, so project exports that repeat names across subsets stay distinct.
* Splits: a subset named train/training -> ``train``, val/valid/validation -> ``val``, test/testing -> ``test``
  (case-insensitive); images without a subset (or subset ``default``) get a seeded ``val_fraction`` split;
  any other subset name is an error.
* Sizes: the declared size (``<image width height>``, or ``meta/.../original_size`` for videos) must equal the
  image's, read from its header before any mask is allocated; a ``<mask>`` box must lie inside the image.
* XML is parsed with ``defusedxml``: DTD entities and external references are refused.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import re
from collections import Counter
from functools import partial
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
import numpy as np
from defusedxml import DefusedXmlException

from segmentation.data.classes import ClassInfo
from segmentation.data.cvat_shapes import AREA_SHAPES, Shape, TrackShape, rasterize, shape_at
from segmentation.data.image_header import MAX_PIXELS, MAX_SIDE, read_image_size
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


def parse_xml(path: Path) -> Element:
    """Parse ``path`` safely. Raises ValueError naming the file (and line/column for malformed XML)."""
    try:
        return SafeET.parse(str(path)).getroot()
    except ParseError as exc:
        line, column = exc.position
        raise ValueError(f"{path}: malformed XML at line {line}, column {column}: {exc}") from None
    except DefusedXmlException as exc:
        raise ValueError(
            f"{path}: refused unsafe XML ({type(exc).__name__}: {exc}); entity declarations and "
            "external references are not allowed in CVAT exports"
        ) from None


def _palette(index: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def parse_labels(root: Element, path: Path) -> list[tuple[str, tuple[int, int, int] | None]]:
    """Declared labels as ``(name, rgb or None)`` in declared order."""
    labels = []
    for owner in ("project", "task", "job"):
        for label in root.findall(f"meta/{owner}/labels/label"):
            name = (label.findtext("name") or "").strip()
            if not name:
                raise ValueError(f"{path}: a label under meta/{owner}/labels has no <name>")
            color = (label.findtext("color") or "").strip()
            if color and not re.fullmatch(r"#[0-9a-fA-F]{6}", color):
                raise ValueError(f"{path}: label {name!r} has colour {color!r}; expected #rrggbb")
            rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5)) if color else None
            if name not in [n for n, _ in labels]:
                labels.append((name, rgb))
    if not labels:
        raise ValueError(f"{path}: no labels declared under meta/project/labels, meta/task/labels or meta/job/labels")
    return labels


def build_classes(labels: list[tuple[str, tuple[int, int, int] | None]]) -> ClassInfo:
    """Background first, then the declared labels (a label named ``background`` is class 0)."""
    names, colors = ["background"], [(0, 0, 0)]
    for name, rgb in labels:
        if name.lower() == "background":
            colors[0] = rgb or colors[0]
            continue
        names.append(name)
        colors.append(rgb or _palette(len(names) - 1))
    return ClassInfo(tuple(names), tuple(colors))


def _required(element: Element, name: str, where: str) -> str:
    value = element.attrib.get(name)
    if value is None:
        raise ValueError(f"{where}: attribute {name} is missing")
    return value


def _floats(element: Element, names: tuple[str, ...], where: str) -> list[float]:
    """The attributes ``names`` as finite floats; ``rotation`` may be absent (0)."""
    values = []
    for name in names:
        text = element.attrib.get(name, "0") if name == "rotation" else _required(element, name, where)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: attribute {name}={text!r} must be a finite number")
        values.append(value)
    return values


def _int(text: str | None, what: str, where: str, low: int, high: int, why: str = "") -> int:
    """``text`` as an integer in ``[low, high]`` (``"3.0"`` is accepted, as some exporters write it)."""
    if text is None:
        raise ValueError(f"{where}: attribute {what} is missing (expected an integer in [{low}, {high}])")
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and low <= value <= high):
        raise ValueError(
            f"{where}: {what} must be an integer in [{low}, {high}], found {text!r}" + (f" ({why})" if why else "")
        )
    return int(value)


def _image_size(width: str | None, height: str | None, where: str) -> tuple[int, int]:
    """Declared ``(height, width)``, refused before any mask is allocated when no readable image can have it."""
    w = _int(width, "width", where, 1, MAX_SIDE)
    h = _int(height, "height", where, 1, MAX_SIDE)
    if w * h > MAX_PIXELS:
        raise ValueError(
            f"{where}: declared size {w}x{h} (W x H) exceeds the {MAX_PIXELS} pixels allowed (OpenCV's image limit)"
        )
    return h, w


def _check_image_size(image: Path, size: tuple[int, int], where: str) -> None:
    """Refuse a declared ``(height, width)`` that differs from the image's header, before any mask is allocated."""
    real = read_image_size(image)
    if real != size:
        raise ValueError(
            f"{where}: declared width x height = {size[1]}x{size[0]} but {image} is {real[1]}x{real[0]} "
            "(W x H, from its header); the declared size must be the image's size"
        )


def parse_shape(element: Element, order: int, where: str, image_size: tuple[int, int] = (MAX_SIDE, MAX_SIDE)) -> Shape:
    """One area shape element (``polygon``, ``box``, ``ellipse``, ``mask``) as a :class:`Shape`.

    ``image_size`` is the image's ``(height, width)``: a mask's ``left/top/width/height`` box must lie inside it.
    """
    kind, label = element.tag, _required(element, "label", f"{where}: {element.tag}")
    where = f"{where}: {kind} {label!r}"
    z_order = _int(element.attrib.get("z_order", "0"), "z_order", where, -(2**31), 2**31 - 1)
    if kind == "polygon":
        text = _required(element, "points", where)
        try:
            points = np.array([[float(v) for v in p.split(",")] for p in text.split(";")])
        except ValueError:
            points = np.zeros(0)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
            raise ValueError(f"{where}: points must be >= 3 finite 'x,y' pairs joined by ';', found {text!r}")
        return Shape(kind, label, z_order, order, points=points)
    if kind == "box":
        return Shape(
            kind, label, z_order, order, box=tuple(_floats(element, ("xtl", "ytl", "xbr", "ybr", "rotation"), where))
        )
    if kind == "ellipse":
        # CVAT 1.1 writes the radii: rx = right - cx, ry = cy - top (not the coordinates of those points).
        cx, cy, rx, ry, rotation = _floats(element, ("cx", "cy", "rx", "ry", "rotation"), where)
        for name, radius in (("rx", rx), ("ry", ry)):
            if radius < 0:
                raise ValueError(f"{where}: attribute {name}={element.attrib[name]!r} must be a radius >= 0")
        return Shape(kind, label, z_order, order, box=(cx, cy, rx, ry, rotation))
    # CVAT writes mask boxes inside the image; bounding them here bounds the runs decoded into them.
    image_height, image_width = image_size
    inside = f"the mask box must lie inside the {image_width}x{image_height} (W x H) image"
    left = _int(element.attrib.get("left"), "left", where, 0, image_width, inside)
    top = _int(element.attrib.get("top"), "top", where, 0, image_height, inside)
    width = _int(element.attrib.get("width"), "width", where, 0, image_width - left, inside)
    height = _int(element.attrib.get("height"), "height", where, 0, image_height - top, inside)
    text = _required(element, "rle", where)
    try:
        rle = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{where}: rle must be comma-separated counts, found {text!r}") from None
    return Shape(kind, label, z_order, order, rle=rle, mask_box=(left, top, width, height))


def _check_label(element: Element, declared: set[str], path: Path, where: str) -> None:
    label = _required(element, "label", f"{path}: {where}: {element.tag}")
    if element.tag != "tag" and label not in declared:  # CVAT allows tags with undeclared labels
        raise ValueError(
            f"{path}: {where}: {element.tag} uses label {label!r}, which meta does not declare "
            f"(declared: {sorted(declared)})"
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


def _frame_image(raw_dir: Path, frame: int, xml: Path) -> Path:
    found = sorted((raw_dir / "images").glob(f"frame_{frame:06d}.*"))
    if not found:
        raise FileNotFoundError(f"{xml}: frame {frame} has no image {raw_dir / 'images'}/frame_{frame:06d}.<ext>")
    return _inside(found[0], raw_dir, f"{xml}: frame {frame}: ")


def _frames(root: Element, xml: Path, raw_dir: Path, declared: set[str], skipped: Counter) -> list[dict]:
    """Frames of one XML file: ``{name, subset, image, height, width, shapes}`` dicts in document order."""
    task_subsets = {t.findtext("id"): (t.findtext("subset") or "") for t in root.findall("meta/project/tasks/task")}
    default_subset = root.findtext("meta/task/subset") or ""
    frames, order = [], 0
    for index, image in enumerate(root.iter("image")):
        name = _required(image, "name", f"{xml}: <image> element {index} (id {image.attrib.get('id')!r})")
        where = f"image {name!r}"
        subset = image.attrib.get("subset", task_subsets.get(image.attrib.get("task_id"), default_subset))
        image_size = _image_size(image.attrib.get("width"), image.attrib.get("height"), f"{xml}: {where}")
        path = _image_path(raw_dir, subset, name, xml)
        _check_image_size(path, image_size, f"{xml}: {where}")
        shapes = []
        for element in image:
            if element.tag not in _SHAPE_TAGS:
                continue
            _check_label(element, declared, xml, where)
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
    image_size = _image_size(width, height, f"{xml}: meta original_size")
    # Frame numbers only bound the loop below, which stops at the first frame without an image.
    num_frames = _int(size, "meta size (frame count)", str(xml), 0, 10**9) if size else None
    parsed = []
    for index, track in enumerate(tracks):
        where = f"track {_required(track, 'id', f'{xml}: <track> element {index}')!r}"
        label, states = _required(track, "label", f"{xml}: {where}"), []
        for element in track:
            element.attrib.setdefault("label", label)
            _check_label(element, declared, xml, where)
            if element.tag not in AREA_SHAPES:
                skipped[element.tag] += 1
                continue
            shape_where = f"{xml}: {where}: {element.tag} {element.attrib['label']!r}"
            frame = _int(element.attrib.get("frame"), "frame", shape_where, 0, 10**9)
            outside = element.attrib.get("outside", "0")  # CVAT always writes it; absent means visible
            if outside not in ("0", "1"):
                raise ValueError(f"{shape_where}: attribute outside={outside!r} must be 0 or 1")
            shape = parse_shape(element, order, f"{xml}: {where}", image_size)
            states.append(TrackShape(frame, outside == "1", shape))
            order += 1
        parsed.append(states)
    last = max((s.frame for states in parsed for s in states), default=-1)
    for frame in range(last + 1 if num_frames is None else num_frames):
        shapes = [s for states in parsed if (s := shape_at(states, frame)) is not None]
        path = _frame_image(raw_dir, frame, xml)
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
    labels = [label for xml, root in roots for label in parse_labels(root, xml)]
    labels = [label for i, label in enumerate(labels) if label[0] not in [n for n, _ in labels[:i]]]
    classes = build_classes(labels)
    label_ids = {name: classes.names.index(name) if name in classes.names else 0 for name, _ in labels}
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
