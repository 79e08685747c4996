"""Prediction for a folder, a glob or a single image: a train-id mask, a colourised mask and an overlay PNG each.

Images go in at their own size (small ones are padded inside the model call, large ones can use a sliding window), up
to the pixel limit serving and batch prediction apply, read from a PNG or JPEG header before any pixel is decoded.
Class names and colours come from the model package, so the outputs use the colours the model was trained with. Every
file is written atomically, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from segmentation.data.classes import ClassInfo, colorize, overlay
from segmentation.data.image_header import ImageHeader, read_image_header
from segmentation.data.samples import read_complete_bytes, read_image
from segmentation.inference.image_bytes import decode_oriented, padded_pixels
from segmentation.inference.predictor import Predictor
from segmentation.inference.tta import check_tta_settings
from segmentation.io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OUTPUT_KINDS = ("mask", "color", "overlay")  # sub-folders of out_dir
# Serving's per-image limit and its variable (segmentation.mlops.serving_requests, which this layer may not import);
# the predict step passes the configured value. Logits take 76 bytes per pixel: 4096 x 4096 costs over 1 GB.
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_PIXELS_ENV = "SEGMENTATION_MAX_PIXELS"
# No image within the pixel limit needs more bytes than this (OpenCV's largest pixels, float32 RGBA, take 16 bytes),
# plus room for metadata and the trailers phones append; a larger file is refused before it is read into memory.
_BYTES_PER_PIXEL, _METADATA_BYTES = 16, 16 << 20


@dataclass
class PredictReport:
    """What a prediction wrote (``outputs[kind]`` lists one path per image read) and what it skipped, and why."""

    out_dir: Path
    outputs: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in OUTPUT_KINDS})
    skipped: dict[Path, str] = field(default_factory=dict)  # input -> the error that kept it out
    overlays: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, RGB image), the first few
    logged: int = 0


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks followed, lies inside ``root`` (symlinks followed too)."""
    return path.resolve().is_relative_to(root.resolve())


def collect_images(spec: str | Path) -> tuple[list[Path], Path]:
    """The images named by ``spec`` (a folder, searched recursively; a glob; or one file) and the folder that
    output paths are made relative to.

    In a folder, a symlink is followed when it resolves inside the folder and skipped, with a warning naming it,
    when it leads elsewhere.

    Raises:
        FileNotFoundError: ``spec`` is neither an existing path nor a glob pattern that matches anything.
        ValueError: the folder holds no image files.
    """
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        files = [p for p in found if _inside(p, path)]
        for outside in sorted(set(found) - set(files)):
            logger.warning(
                "skipped %s: a symlink to %s, outside the input folder %s", outside, outside.resolve(), path
            )
        if not files:
            raise ValueError(f"no images in folder {path} (looked recursively for {', '.join(IMAGE_SUFFIXES)})")
        return files, path
    if path.is_file():
        return [path], path.parent
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"the pattern {spec!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent.absolute()) for p in files]))
        return [p.absolute() for p in files], root
    raise FileNotFoundError(f"input not found: {spec!r} (expected a folder, an image file or a glob pattern)")


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; ``ValueError`` when it exists and is not a folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a folder: name a folder (it is created if missing)")
    return out_dir


def output_name(relative: Path) -> Path:
    """Where the outputs of an input go, relative to each output folder: the same path with ``.png`` as suffix.

    A name that is nothing but its suffix and dots (``..png``) keeps it whole (``..png.png``): dropping the suffix
    would leave ``.`` or ``..``, which name folders.
    """
    stem = relative.name[: -len(relative.suffix)] if relative.suffix else relative.name
    return relative.parent / ((stem if stem.strip(".") else relative.name) + ".png")


def _output_names(files: list[Path], root: Path) -> list[Path]:
    # Relative to the root as the paths are written (symlinks not followed), so a link keeps its own name.
    names = [output_name(Path(os.path.relpath(p.absolute(), root.absolute()))) for p in files]
    seen: dict[Path, Path] = {}
    for name, source in zip(names, files, strict=True):
        if name in seen:
            raise ValueError(
                f"{seen[name]} and {source} would write the same outputs ({name}); "
                "rename one or predict them separately"
            )
        seen[name] = source
    return names


def _check_pixels(path: Path, height: int, width: int, max_pixels: int) -> None:
    padded = padded_pixels(ImageHeader(height, width))
    if padded > max_pixels:
        size = f"{width}x{height} = {height * width} pixels" + (
            f" ({padded} once padded for the network)" if padded != height * width else ""
        )
        raise ValueError(
            f"{path}: image is {size}, more than the limit of {max_pixels} pixels; shrink or tile it, or raise "
            f"{MAX_PIXELS_ENV} (the limit serving and batch_predict apply too)"
        )


def read_input_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The ``H x W x 3`` uint8 BGR pixels of an input image, EXIF orientation applied, checked before they cost memory.

    A PNG or JPEG is checked from its header first, as serving checks a request: more than ``max_pixels`` (padded as
    the network pads) is refused before any pixel is decoded. Truncated files are refused (OpenCV would fill the lost
    rows with grey), as are empty, corrupt ones and a file larger than any image within the limit needs. Other formats
    (BMP, TIFF, WebP, PPM) have no header reader here: OpenCV decodes them within its own 2^30 pixel ceiling and the
    limit is checked on the decoded size, before the network runs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``, what was found and what is allowed.
    """
    header = read_image_header(path)
    if header is not None:
        _check_pixels(path, *header.shape, max_pixels)
    size, max_bytes = path.stat().st_size, _BYTES_PER_PIXEL * max_pixels + _METADATA_BYTES
    if size > max_bytes:
        raise ValueError(
            f"{path}: {size} bytes, more than an image of at most {max_pixels} pixels needs "
            f"({max_bytes} bytes); check that it is one image"
        )
    if header is None:
        image = read_image(path)  # the checks preprocessing applies
    else:  # decoded and oriented as serving does it, by the header's own EXIF orientation
        image = decode_oriented(read_complete_bytes(path), header)
        if image is None:
            raise ValueError(
                f"{path}: not decodable as the {header.shape[1]}x{header.shape[0]} (W x H) image its header "
                "declares; the file is corrupt or malformed"
            )
    _check_pixels(path, *image.shape[:2], max_pixels)
    return image


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"could not write {path}")


def predict_images(
    predictor: Predictor,
    classes: ClassInfo,
    files: list[Path],
    root: Path,
    out_dir: str | Path,
    *,
    tta: str = "none",
    sliding_window: int = 0,
    num_overlays: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PredictReport:
    """Predict each image and write ``out_dir/{mask,color,overlay}/<path relative to root>.png``.

    Each file is read by :func:`read_input_image`. One that cannot be read, or is refused (truncated, more than
    ``max_pixels``), is skipped, and the others are predicted; one warning at the end names each skipped file and
    why (``report.skipped``). The first ``num_overlays`` overlays are kept in ``report.overlays`` (RGB) for the caller
    to log.

    Raises:
        ValueError: none of the images could be read (the message names each and why), two inputs map to the same
            output name, or bad ``tta``.
    """
    check_tta_settings(tta, sliding_window=sliding_window)
    out_dir = check_out_dir(out_dir)
    names = _output_names(files, root)
    report = PredictReport(out_dir)
    for source, name in tqdm(list(zip(files, names, strict=True)), desc="predict", unit="image", mininterval=2.0):
        try:
            image = read_input_image(source, max_pixels)
        except (OSError, ValueError) as exc:
            report.skipped[source] = str(exc)
            continue
        mask = predictor.predict_mask(image, tta=tta, sliding_window=sliding_window)
        blended = overlay(image, mask, classes)
        pictures = {"mask": mask, "color": colorize(mask, classes)[..., ::-1], "overlay": blended}
        for kind, picture in pictures.items():
            target = out_dir / kind / name
            _write_png(target, picture)
            report.outputs[kind].append(target)
        if len(report.overlays) < num_overlays:
            report.overlays.append((str(name.with_suffix("")), blended[..., ::-1]))
    reasons = "; ".join(report.skipped.values())
    if report.skipped:
        logger.warning("skipped %d unreadable or refused image(s): %s", len(report.skipped), reasons)
    if not report.outputs["mask"]:
        raise ValueError(f"none of the {len(files)} input image(s) could be read: {reasons}")
    return report
