"""CVAT XML 1.1 elements read into values, each refused with a message naming the file and element: the document
(parsed with ``defusedxml``: DTD entities and external references are refused), the declared labels and the class
table built from them, attributes as bounded numbers, declared image sizes, and area shapes.

:func:`segmentation.data.cvat.read_cvat` walks an export's images and tracks with these.
"""

from __future__ import annotations

import colorsys
import math
import re
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
import numpy as np
from defusedxml import DefusedXmlException

from segmentation.data.classes import IGNORE_INDEX, ClassInfo
from segmentation.data.cvat_shapes import Shape
from segmentation.data.image_header import MAX_PIXELS, MAX_SIDE

# ElementTree holds a parsed file in ~13x its size; CVAT exports one XML per task, so a larger project splits.
MAX_XML_BYTES = 256 << 20
# Class ids share the 8-bit mask with the ignore index 255: background is 0, the labels 1..254.
MAX_LABELS = IGNORE_INDEX - 1


def parse_xml(path: Path) -> Element:
    """Parse ``path`` safely. Raises ValueError naming the file (and line/column for malformed XML, or its size
    above :data:`MAX_XML_BYTES`, checked before it is read)."""
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise ValueError(
            f"{path}: {size} bytes, above the {MAX_XML_BYTES} bytes an annotation XML may have (parsing holds ~13x "
            "that in memory); export the project as several tasks, one XML each, into cvat/"
        )
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


def parse_labels(root: Element, path: Path) -> dict[str, tuple[int, int, int] | None]:
    """Declared labels as ``{name: rgb or None}`` in declared order; a name declared again keeps its first colour."""
    labels: dict[str, tuple[int, int, int] | None] = {}
    for owner in ("project", "task", "job"):
        for label in root.findall(f"meta/{owner}/labels/label"):
            name = (label.findtext("name") or "").strip()
            if not name:
                raise ValueError(f"{path}: a label under meta/{owner}/labels has no <name>")
            color = (label.findtext("color") or "").strip()
            if color and not re.fullmatch(r"#[0-9a-fA-F]{6}", color):
                raise ValueError(f"{path}: label {name!r} has colour {color!r}; expected #rrggbb")
            rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5)) if color else None
            labels.setdefault(name, rgb)
    if not labels:
        raise ValueError(f"{path}: no labels declared under meta/project/labels, meta/task/labels or meta/job/labels")
    return labels


def build_classes(labels: dict[str, tuple[int, int, int] | None], source: str) -> ClassInfo:
    """Background first, then the declared labels (a label named ``background`` is class 0).

    Raises:
        ValueError: more than :data:`MAX_LABELS` labels besides background; the message names ``source`` (the XML
            files that declare them).
    """
    count = sum(name.lower() != "background" for name in labels)
    if count > MAX_LABELS:
        raise ValueError(
            f"{source}: declares {count} labels besides background; at most {MAX_LABELS} are allowed, as masks "
            f"are 8-bit and class ids 0..{MAX_LABELS} must stay below the ignore index {IGNORE_INDEX}"
        )
    names, colors = ["background"], [(0, 0, 0)]
    for name, rgb in labels.items():
        if name.lower() == "background":
            colors[0] = rgb or colors[0]
            continue
        names.append(name)
        colors.append(rgb or _palette(len(names) - 1))
    return ClassInfo(tuple(names), tuple(colors))


def required_attr(element: Element, name: str, where: str) -> str:
    """The attribute ``name`` of ``element``; ValueError naming ``where`` when it is missing."""
    value = element.attrib.get(name)
    if value is None:
        raise ValueError(f"{where}: attribute {name} is missing")
    return value


def _floats(element: Element, names: tuple[str, ...], where: str) -> list[float]:
    """The attributes ``names`` as finite floats; ``rotation`` may be absent (0)."""
    values = []
    for name in names:
        text = element.attrib.get(name, "0") if name == "rotation" else required_attr(element, name, where)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{where}: attribute {name}={text!r} must be a finite number")
        values.append(value)
    return values


def int_attr(text: str | None, what: str, where: str, low: int, high: int, why: str = "") -> int:
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


def declared_size(width: str | None, height: str | None, where: str) -> tuple[int, int]:
    """Declared ``(height, width)``, refused before any mask is allocated when no readable image can have it."""
    w = int_attr(width, "width", where, 1, MAX_SIDE)
    h = int_attr(height, "height", where, 1, MAX_SIDE)
    if w * h > MAX_PIXELS:
        raise ValueError(
            f"{where}: declared size {w}x{h} (W x H) exceeds the {MAX_PIXELS} pixels allowed (OpenCV's image limit)"
        )
    return h, w


def parse_shape(element: Element, order: int, where: str, image_size: tuple[int, int] = (MAX_SIDE, MAX_SIDE)) -> Shape:
    """One area shape element (``polygon``, ``box``, ``ellipse``, ``mask``) as a :class:`Shape`.

    ``image_size`` is the image's ``(height, width)``: a mask's ``left/top/width/height`` box must lie inside it.
    """
    kind, label = element.tag, required_attr(element, "label", f"{where}: {element.tag}")
    where = f"{where}: {kind} {label!r}"
    z_order = int_attr(element.attrib.get("z_order", "0"), "z_order", where, -(2**31), 2**31 - 1)
    if kind == "polygon":
        text = required_attr(element, "points", where)
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
    left = int_attr(element.attrib.get("left"), "left", where, 0, image_width, inside)
    top = int_attr(element.attrib.get("top"), "top", where, 0, image_height, inside)
    width = int_attr(element.attrib.get("width"), "width", where, 0, image_width - left, inside)
    height = int_attr(element.attrib.get("height"), "height", where, 0, image_height - top, inside)
    text = required_attr(element, "rle", where)
    try:
        rle = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{where}: rle must be comma-separated counts, found {text!r}") from None
    return Shape(kind, label, z_order, order, rle=rle, mask_box=(left, top, width, height))


def check_label(element: Element, declared: set[str], path: Path, where: str) -> None:
    """Refuse a shape whose label the document's meta does not declare (tags may use any label)."""
    label = required_attr(element, "label", f"{path}: {where}: {element.tag}")
    if element.tag != "tag" and label not in declared:  # CVAT allows tags with undeclared labels
        raise ValueError(
            f"{path}: {where}: {element.tag} uses label {label!r}, which meta does not declare "
            f"(declared: {sorted(declared)})"
        )
