"""Prediction for a folder, a glob or a single image: a train-id mask, a colourised mask and an overlay PNG each.

Images of any size go in as they are (small ones are padded inside the model call, large ones can use a sliding
window). Class names and colours come from the model package, so the outputs use the colours the model was trained
with. Every file is written atomically, so an interrupted run never leaves a half-written PNG.
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
from segmentation.inference.predictor import Predictor
from segmentation.inference.tta import check_tta_settings
from segmentation.io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OUTPUT_KINDS = ("mask", "color", "overlay")  # sub-folders of out_dir


@dataclass
class PredictReport:
    """What a prediction wrote (``outputs[kind]`` lists one path per image read) and what it skipped."""

    out_dir: Path
    outputs: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in OUTPUT_KINDS})
    skipped: list[Path] = field(default_factory=list)
    overlays: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (name, RGB image), the first few
    logged: int = 0


def collect_images(spec: str | Path) -> tuple[list[Path], Path]:
    """The images named by ``spec`` (a folder, searched recursively; a glob; or one file) and the folder that
    output paths are made relative to.

    Raises:
        FileNotFoundError: ``spec`` is neither an existing path nor a glob pattern that matches anything.
        ValueError: the folder holds no image files.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images in folder {path} (looked recursively for {', '.join(IMAGE_SUFFIXES)})")
        return files, path
    if path.is_file():
        return [path], path.parent
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"the pattern {spec!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent.resolve()) for p in files]))
        return [p.resolve() for p in files], root
    raise FileNotFoundError(f"input not found: {spec!r} (expected a folder, an image file or a glob pattern)")


def _output_stems(files: list[Path], root: Path) -> list[Path]:
    stems = [p.resolve().relative_to(root.resolve()).with_suffix("") for p in files]
    seen: dict[Path, Path] = {}
    for stem, source in zip(stems, files, strict=True):
        if stem in seen:
            raise ValueError(
                f"{seen[stem]} and {source} would write the same outputs ({stem}.png); "
                "rename one or predict them separately"
            )
        seen[stem] = source
    return stems


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
) -> PredictReport:
    """Predict each image and write ``out_dir/{mask,color,overlay}/<path relative to root>.png``.

    Unreadable files are skipped with one warning that lists them. The first ``num_overlays`` overlays are kept in
    ``report.overlays`` (RGB) for the caller to log.

    Raises:
        ValueError: none of the images could be read, two inputs map to the same output name, or bad ``tta``.
    """
    check_tta_settings(tta, sliding_window=sliding_window)
    out_dir = Path(out_dir)
    stems = _output_stems(files, root)
    report = PredictReport(out_dir)
    for source, stem in tqdm(list(zip(files, stems, strict=True)), desc="predict", unit="image", mininterval=2.0):
        # IMREAD_COLOR turns grey, 16-bit and RGBA inputs into the 8-bit BGR the model expects.
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            report.skipped.append(source)
            continue
        mask = predictor.predict_mask(image, tta=tta, sliding_window=sliding_window)
        blended = overlay(image, mask, classes)
        pictures = {"mask": mask, "color": colorize(mask, classes)[..., ::-1], "overlay": blended}
        for kind, picture in pictures.items():
            target = out_dir / kind / stem.with_suffix(".png")
            _write_png(target, picture)
            report.outputs[kind].append(target)
        if len(report.overlays) < num_overlays:
            report.overlays.append((str(stem), blended[..., ::-1]))
    if report.skipped:
        logger.warning(
            "skipped %d unreadable image(s): %s", len(report.skipped), ", ".join(str(p) for p in report.skipped)
        )
    if not report.outputs["mask"]:
        raise ValueError(
            f"none of the {len(files)} input image(s) could be read: {', '.join(str(p) for p in report.skipped)}"
        )
    return report
