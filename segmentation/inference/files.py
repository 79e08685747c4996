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
    out_dir = check_out_dir(out_dir)
    names = _output_names(files, root)
    report = PredictReport(out_dir)
    for source, name in tqdm(list(zip(files, names, strict=True)), desc="predict", unit="image", mininterval=2.0):
        # IMREAD_COLOR turns grey, 16-bit and RGBA inputs into the 8-bit BGR the model expects.
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            report.skipped.append(source)
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
    if report.skipped:
        logger.warning(
            "skipped %d unreadable image(s): %s", len(report.skipped), ", ".join(str(p) for p in report.skipped)
        )
    if not report.outputs["mask"]:
        raise ValueError(
            f"none of the {len(files)} input image(s) could be read: {', '.join(str(p) for p in report.skipped)}"
        )
    return report
