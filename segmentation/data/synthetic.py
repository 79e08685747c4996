"""A procedurally drawn street scene with Cityscapes train-id labels: the built-in default dataset.

Each image is drawn from its own seed, so image ``i`` is the same at any dataset size. A scene has a sky gradient
with clouds, buildings with windows along a horizon, a road in perspective with lane marks, sidewalks with
tiles, trees (vegetation), poles, people and cars that shrink towards the horizon, then lighting changes, blur
and sensor noise. Classes keep distinct colours and textures (the variation is realistic, the classes are not
ambiguous) so that a small CNN learns them within a few CPU minutes.

Only road, sidewalk, building, pole, vegetation, sky, person and car occur; the class table is still the full
19-class Cityscapes one, so models trained here are ordinary Cityscapes models.
"""

from __future__ import annotations

import cv2
import numpy as np

ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 8, 10, 11, 13
SYNTHETIC_CLASS_IDS = (ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR)
MIN_SIDE = 32

# Base colours (RGB) per class; each object jitters them. Kept apart in hue/brightness on purpose.
_CAR_COLORS = ((200, 30, 30), (30, 60, 190), (230, 200, 40), (20, 140, 150), (240, 240, 245), (25, 25, 30))
_CLOTHES = ((150, 30, 120), (230, 120, 20), (60, 30, 140), (200, 40, 60), (30, 120, 60))


class _Canvas:
    """An RGB float image and its label mask, painted together so that they always agree."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.height, self.width, self.rng = height, width, rng
        self.image = np.zeros((height, width, 3), np.float32)
        self.mask = np.full((height, width), SKY, np.uint8)
        small = rng.normal(size=(max(height // 8, 2), max(width // 8, 2))).astype(np.float32)
        self.smooth = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        self.fine = rng.normal(size=(height, width)).astype(np.float32)

    def paint(self, region: np.ndarray, color, class_id: int, smooth: float = 0.06, fine: float = 0.04) -> None:
        """Fill ``region`` (bool or 0/1 uint8) with ``color`` modulated by low- and high-frequency texture."""
        region = region.astype(bool)
        factor = 1.0 + smooth * self.smooth[region] + fine * self.fine[region]
        self.image[region] = np.clip(np.asarray(color, np.float32)[None] * factor[:, None], 0, 255)
        self.mask[region] = class_id

    def blank(self) -> np.ndarray:
        """An empty uint8 region to draw into with OpenCV primitives (value 1)."""
        return np.zeros((self.height, self.width), np.uint8)

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return cv2.rectangle(self.blank(), (int(x0), int(y0)), (int(x1), int(y1)), 1, -1)


def _jitter(rng: np.random.Generator, color, amount: float = 18.0) -> tuple[float, float, float]:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in color)


def _sky_and_buildings(c: _Canvas, horizon: int) -> None:
    rng, h, w = c.rng, c.height, c.width
    top, bottom = np.array(_jitter(rng, (70, 130, 200), 15)), np.array(_jitter(rng, (170, 205, 235), 15))
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    c.image[:] = (1 - t) * top + t * bottom
    clouds = np.clip(c.smooth, 0.6, None) - 0.6
    c.image += (clouds[..., None] * 60).astype(np.float32)
    x = int(rng.integers(-w // 10, w // 20))
    while x < w:
        bw = int(rng.uniform(0.12, 0.3) * w)
        if rng.random() < 0.15:  # a gap between buildings shows the sky
            x += bw // 2
            continue
        roof = int(rng.uniform(0.02, 0.8) * horizon)
        base = _jitter(rng, rng.choice([(120, 110, 100), (150, 135, 115), (95, 90, 88), (165, 150, 140)]), 15)
        c.paint(c.rect(x, roof, x + bw, horizon), base, BUILDING, smooth=0.08)
        win_w, win_h = max(2, bw // 8), max(2, h // 28)
        glass = _jitter(rng, (45, 55, 75), 12)
        for wy in range(roof + win_h, horizon - win_h, 2 * win_h):
            for wx in range(x + win_w // 2, x + bw - win_w, 2 * win_w):
                if rng.random() < 0.85:
                    c.paint(c.rect(wx, wy, wx + win_w - 1, wy + win_h - 1), glass, BUILDING, smooth=0.2)
        x += bw


def _ground(c: _Canvas, horizon: int) -> tuple[int, float, float]:
    rng, h, w = c.rng, c.height, c.width
    vx = int(rng.uniform(0.35, 0.65) * w)
    left, right = rng.uniform(-0.6, 0.15) * w, rng.uniform(0.85, 1.6) * w
    below = c.rect(0, horizon, w - 1, h - 1)
    c.paint(below, _jitter(rng, (200, 170, 175), 15), SIDEWALK, smooth=0.05, fine=0.03)
    # Paving joints: darker lines across the sidewalk, still sidewalk.
    joints = c.blank()
    for y in range(horizon, h, max(3, h // 20)):
        cv2.line(joints, (0, y), (w - 1, y), 1, 1)
    c.paint(joints, _jitter(rng, (150, 125, 130), 10), SIDEWALK)
    road = np.array([[vx - 1, horizon], [vx + 1, horizon], [right, h - 1], [left, h - 1]], np.int32)
    c.paint(cv2.fillPoly(c.blank(), [road], 1), _jitter(rng, (75, 72, 78), 10), ROAD, smooth=0.1)
    lane_x = (left + right) / 2
    for y0 in range(horizon + 2, h, max(6, h // 10)):
        y1 = min(y0 + max(2, h // 25), h - 1)
        p0, p1 = ((round(vx + (lane_x - vx) * (y - horizon) / (h - horizon)), y) for y in (y0, y1))
        thick = max(1, round(w * 0.006 * (y0 - horizon) / (h - horizon) * 2))
        c.paint(cv2.line(c.blank(), p0, p1, 1, thick), (225, 225, 215), ROAD)
    return vx, left, right


def _objects(c: _Canvas, horizon: int, vx: int, left: float, right: float) -> None:
    rng, h, w = c.rng, c.height, c.width

    def road_edges(y: float) -> tuple[float, float]:
        f = (y - horizon) / (h - horizon)
        return vx + (left - vx) * f, vx + (right - vx) * f

    items = []
    for _ in range(rng.integers(1, 4)):
        items.append(("tree", rng.uniform(horizon + 0.05 * h, h * 0.95)))
    for _ in range(rng.integers(1, 4)):
        items.append(("pole", rng.uniform(horizon + 0.1 * h, h)))
    for _ in range(rng.integers(1, 5)):
        items.append(("person", rng.uniform(horizon + 0.1 * h, h)))
    for _ in range(rng.integers(1, 4)):
        items.append(("car", rng.uniform(horizon + 0.15 * h, h + 0.1 * h)))
    for kind, base in sorted(items, key=lambda item: item[1]):  # far objects first, near ones cover them
        scale = (base - horizon) / (h - horizon)
        lo, hi = road_edges(base)
        side = rng.random() < 0.5
        if kind == "car":
            cw, ch = scale * w * rng.uniform(0.22, 0.3), scale * h * rng.uniform(0.25, 0.32)
            cx = rng.uniform(lo + cw / 2, max(hi - cw / 2, lo + cw / 2 + 1))
            x0, x1, y0, y1 = int(cx - cw / 2), int(cx + cw / 2), int(base - ch), int(base)
            body = c.rect(x0, y0 + ch * 0.35, x1, y1) | c.rect(x0 + cw * 0.15, y0, x1 - cw * 0.15, y0 + ch * 0.4)
            c.paint(body, _jitter(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 20), CAR, smooth=0.03)
            glass = c.rect(x0 + cw * 0.2, y0 + ch * 0.07, x1 - cw * 0.2, y0 + ch * 0.35)
            c.paint(glass, _jitter(rng, (40, 50, 65), 8), CAR)
            r = max(1, int(ch * 0.16))
            wheels = c.blank()
            for wx in (x0 + cw * 0.2, x1 - cw * 0.2):
                cv2.circle(wheels, (int(wx), y1), r, 1, -1)
            c.paint(wheels, (20, 20, 20), CAR)
            continue
        x = (
            rng.uniform(lo - 0.25 * w * scale, lo - 0.02 * w)
            if side
            else rng.uniform(hi + 0.02 * w, hi + 0.25 * w * scale)
        )
        x = float(np.clip(x, 0, w - 1))
        if kind == "tree":
            th, tw = scale * h * rng.uniform(0.6, 1.1), max(2, scale * w * 0.025)
            trunk = c.rect(x - tw / 2, base - th * 0.55, x + tw / 2, base)
            c.paint(trunk, _jitter(rng, (95, 70, 45), 10), VEGETATION)
            crown = c.blank()
            for _ in range(5):
                centre = (int(x + rng.uniform(-0.25, 0.25) * th), int(base - th * rng.uniform(0.55, 0.95)))
                cv2.circle(crown, centre, max(2, int(th * rng.uniform(0.18, 0.3))), 1, -1)
            c.paint(crown, _jitter(rng, (70, 130, 40), 20), VEGETATION, smooth=0.25, fine=0.15)
        elif kind == "pole":
            ph, pw = scale * h * rng.uniform(0.9, 1.5), max(2, round(scale * w * 0.02))
            c.paint(c.rect(x, base - ph, int(x) + pw - 1, base), _jitter(rng, (175, 180, 190), 12), POLE, smooth=0.02)
        else:
            ph = max(8, scale * h * rng.uniform(0.45, 0.6))
            body = cv2.ellipse(
                c.blank(), (int(x), int(base - ph * 0.42)), (max(1, int(ph * 0.14)), int(ph * 0.42)), 0, 0, 360, 1, -1
            )
            c.paint(body, _jitter(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 20), PERSON)
            head = cv2.circle(c.blank(), (int(x), int(base - ph * 0.9)), max(1, int(ph * 0.1)), 1, -1)
            c.paint(head, _jitter(rng, (225, 180, 150), 15), PERSON)


def generate_scene(height: int, width: int, seed: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene.

    Args:
        height: image height in pixels (>= 32).
        width: image width in pixels (>= 32).
        seed: an int or a tuple of ints (e.g. ``(dataset_seed, index)``); the same seed gives the same image
            and mask, bit for bit.

    Returns:
        ``(image_bgr, mask)``: ``H x W x 3`` uint8 BGR (OpenCV order, as files are read) and ``H x W`` uint8
        Cityscapes train ids drawn from :data:`SYNTHETIC_CLASS_IDS`.

    Raises:
        ValueError: a side is smaller than 32 pixels.
    """
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"synthetic images need height and width >= {MIN_SIDE}, got {height}x{width} (H x W)")
    rng = np.random.default_rng(list(seed) if isinstance(seed, tuple) else seed)
    canvas = _Canvas(height, width, rng)
    horizon = int(rng.uniform(0.38, 0.55) * height)
    _sky_and_buildings(canvas, horizon)
    vx, left, right = _ground(canvas, horizon)
    _objects(canvas, horizon, vx, left, right)
    image = canvas.image * rng.uniform(0.75, 1.2) + rng.uniform(-15, 15)  # exposure and brightness
    image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 0.8))
    image = image + rng.normal(0, rng.uniform(2, 6), image.shape).astype(np.float32)
    image_bgr = np.clip(image, 0, 255).astype(np.uint8)[..., ::-1]
    return np.ascontiguousarray(image_bgr), canvas.mask
