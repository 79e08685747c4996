"""CVAT shapes as data, their rasterisation and the per-frame interpolation of video tracks.

Geometry follows CVAT's XML format 1.1: coordinates in pixels of the full image, ``box`` rotation in degrees
clockwise about the box centre, ``mask`` as run lengths (starting with background) over its own
``left/top/width/height`` box in row-major order, ``ellipse`` as centre ``cx, cy``, radii ``rx, ry`` and rotation
(clockwise, degrees). Polygons and boxes are filled with ``cv2.fillPoly`` on vertices rounded to the nearest pixel,
edges included, the convention also used for Cityscapes polygons. An ellipse labels the pixels whose centre lies in
it (a radius-5 circle: 81 pixels); its centre and radii keep their fractions.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from segmentation.data.image_header import MAX_PIXELS
from segmentation.data.samples import check_near_image

AREA_SHAPES = ("polygon", "box", "mask", "ellipse")
# Shapes without an area: they cannot label pixels of a segmentation mask, so they are counted and skipped.
SKIPPED_SHAPES = ("polyline", "points", "skeleton", "tag", "cuboid")


@dataclass(frozen=True)
class Shape:
    """One annotation on one frame. ``order`` is its position in the document (ties in ``z_order`` keep it)."""

    kind: str
    label: str
    z_order: int = 0
    order: int = 0
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # polygon: N x 2 (x, y)
    box: tuple[float, ...] = ()  # box: xtl, ytl, xbr, ybr, rotation; ellipse: cx, cy, rx, ry (radii), rotation
    rle: tuple[int, ...] = ()  # mask: run lengths over the left/top/width/height box
    mask_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # mask: left, top, width, height


@dataclass(frozen=True)
class TrackShape:
    """A track's state at one frame, as written in a "CVAT for video 1.1" export."""

    frame: int
    outside: bool
    shape: Shape


def decode_rle(rle: tuple[int, ...], width: int, height: int, where: str) -> np.ndarray:
    """Decode CVAT mask runs (background first) into an ``height x width`` bool array.

    Raises:
        ValueError: the box is negative or larger than ``MAX_PIXELS``, or the runs are negative or do not add up
            to ``width * height``.
    """
    if width < 0 or height < 0 or width * height > MAX_PIXELS:
        raise ValueError(
            f"{where}: mask box is {width}x{height} (W x H); sides must be >= 0 and the area at most "
            f"{MAX_PIXELS} pixels"
        )
    # Sum in Python integers: a hostile count beyond int64 must be reported, not overflow numpy.
    total = sum(rle)
    if not rle or any(r < 0 for r in rle) or total != width * height:
        raise ValueError(
            f"{where}: mask rle has runs summing to {total}, expected width*height = {width}*{height} "
            f"= {width * height} non-negative counts"
        )
    values = np.arange(len(rle)) % 2 == 1  # runs alternate background, foreground, background, ...
    return np.repeat(values, np.asarray(rle, dtype=np.int64)).reshape(height, width)


def box_corners(xtl: float, ytl: float, xbr: float, ybr: float, rotation: float) -> np.ndarray:
    """The 4 x 2 corners of a box rotated ``rotation`` degrees clockwise (on screen) about its centre."""
    corners = np.array([[xtl, ytl], [xbr, ytl], [xbr, ybr], [xtl, ybr]], dtype=np.float64)
    if rotation:
        centre = corners.mean(axis=0)
        theta = math.radians(rotation)
        # With y pointing down, the usual counter-clockwise matrix turns the picture clockwise.
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        corners = (corners - centre) @ rot.T + centre
    return corners


def _check_extent(points: np.ndarray, mask: np.ndarray, where: str) -> None:
    check_near_image(points, mask.shape[0], mask.shape[1], where)


def _fill_ellipse(mask: np.ndarray, ellipse: tuple[float, ...], reach: float, value: int) -> None:
    """Set the pixels whose centre lies inside the ellipse ``(cx, cy, rx, ry, rotation)``, clipped to ``mask``."""
    cx, cy, rx, ry, rotation = ellipse
    x0, x1 = max(math.floor(cx - reach), 0), min(math.ceil(cx + reach), mask.shape[1] - 1)
    y0, y1 = max(math.floor(cy - reach), 0), min(math.ceil(cy + reach), mask.shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return
    dx = np.arange(x0, x1 + 1, dtype=np.float64)[None, :] - cx
    dy = np.arange(y0, y1 + 1, dtype=np.float64)[:, None] - cy
    # Coordinates along the ellipse's own axes: undo its clockwise (on screen) rotation, as in box_corners.
    theta = math.radians(rotation)
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = dy * math.cos(theta) - dx * math.sin(theta)
    # (u / rx)^2 + (v / ry)^2 <= 1 without dividing; the bounds on |u| and |v| follow from it for non-zero radii
    # and keep a zero radius to its segment (or a point) instead of NaN or the whole window.
    inside = ((u * ry) ** 2 + (v * rx) ** 2 <= (rx * ry) ** 2) & (np.abs(u) <= rx) & (np.abs(v) <= ry)
    mask[y0 : y1 + 1, x0 : x1 + 1][inside] = value


def draw_shape(mask: np.ndarray, shape: Shape, value: int, where: str) -> None:
    """Paint ``shape`` into ``mask`` (in place) with ``value``; parts outside the image are clipped.

    Raises:
        ValueError: the shape reaches far outside the image, a mask shape's box leaves the image, or its runs are
            invalid.
    """
    if shape.kind == "polygon":
        _check_extent(shape.points, mask, where)
        cv2.fillPoly(mask, [np.rint(shape.points).astype(np.int32)], value)
    elif shape.kind == "box":
        corners = box_corners(*shape.box)
        _check_extent(corners, mask, where)
        cv2.fillPoly(mask, [np.rint(corners).astype(np.int32)], value)
    elif shape.kind == "ellipse":
        cx, cy, rx, ry, rotation = shape.box
        reach = max(abs(rx), abs(ry))  # any rotation stays within the circle of the larger radius
        _check_extent(np.array([[cx - reach, cy - reach], [cx + reach, cy + reach]]), mask, where)
        _fill_ellipse(mask, shape.box, reach, value)
    elif shape.kind == "mask":
        left, top, width, height = shape.mask_box
        if left < 0 or top < 0 or left + width > mask.shape[1] or top + height > mask.shape[0]:
            raise ValueError(
                f"{where}: mask box left={left} top={top} width={width} height={height} leaves its "
                f"{mask.shape[1]}x{mask.shape[0]} (W x H) image; CVAT mask boxes lie inside the image"
            )
        region = decode_rle(shape.rle, width, height, where)
        window = mask[top : top + height, left : left + width]
        window[region] = value
    else:
        raise ValueError(f"{where}: cannot rasterise a {shape.kind!r} shape")


def rasterize(shapes: list[Shape], height: int, width: int, label_ids: dict[str, int], where: str) -> np.ndarray:
    """Draw area shapes into an ``height x width`` uint8 mask of class ids (background 0).

    Shapes are drawn by ascending ``z_order``, then document order, so a later shape covers an earlier one.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    for shape in sorted(shapes, key=lambda s: (s.z_order, s.order)):
        draw_shape(mask, shape, label_ids[shape.label], f"{where}: {shape.kind} {shape.label!r}")
    return mask


def _lerp(a: np.ndarray | tuple, b: np.ndarray | tuple, t: float) -> np.ndarray:
    return (1.0 - t) * np.asarray(a, dtype=np.float64) + t * np.asarray(b, dtype=np.float64)


def _frame_of(state: TrackShape) -> int:
    return state.frame


def shape_at(track: list[TrackShape], frame: int) -> Shape | None:
    """The track's shape on ``frame``, or ``None`` where the object is outside (or not yet seen).

    ``track`` is in frame order (entries of one frame in document order, the first of them counts), so finding
    the entries around ``frame`` costs a binary search, not a pass over the track.

    A frame written in the export is used as is. Between two written frames a polygon (same vertex count) or a
    box/ellipse is interpolated linearly; masks, polygons whose vertex count changes, and the frames before an
    ``outside`` entry keep the previous shape; after the last entry the shape persists, as in CVAT.
    """
    after = bisect.bisect_right(track, frame, key=_frame_of)  # track[after:] lies after ``frame``
    if after == 0:
        return None
    prev = track[bisect.bisect_left(track, track[after - 1].frame, key=_frame_of)]
    if prev.outside:
        return None
    if prev.frame == frame or after == len(track):
        return prev.shape
    nxt = track[after]
    a, b = prev.shape, nxt.shape
    if nxt.outside or a.kind != b.kind:
        return a
    t = (frame - prev.frame) / (nxt.frame - prev.frame)
    if a.kind in ("box", "ellipse"):
        return replace(a, box=tuple(float(v) for v in _lerp(a.box, b.box, t)))
    if a.kind == "polygon" and a.points.shape == b.points.shape:
        return replace(a, points=_lerp(a.points, b.points, t))
    return a
