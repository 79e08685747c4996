"""Batch prediction for a folder, a glob or a single image: a train-id mask, a colourised mask and an overlay each.

Images of any size go in as they are (small ones are padded inside the model call, large ones can use a sliding
window). Class names and colours come from the model package, so the outputs use the colours the model was trained
with. Every file is written atomically, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from segmentation.data.classes import ClassInfo, colorize
from segmentation.evaluate import TTA_MODES, build_runner, predict_logits, resolve_device
from segmentation.io import atomic_path
from segmentation.models.preprocessing import to_input_tensor
from segmentation.visualize import overlay

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OUTPUT_KINDS = ("mask", "color", "overlay")  # sub-folders of out_dir


@dataclass
class PredictReport:
    """What a prediction wrote (``outputs[kind]`` lists one path per image read) and what it skipped."""

    out_dir: Path
    outputs: dict[str, list[Path]] = field(default_factory=lambda: {k: [] for k in OUTPUT_KINDS})
    skipped: list[Path] = field(default_factory=list)
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
            raise ValueError(f"{seen[stem]} and {source} would write the same outputs ({stem}.png); "
                             "rename one or predict them separately")
        seen[stem] = source
    return stems


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"could not write {path}")


def predict_mask(model: Callable[[torch.Tensor], torch.Tensor], image_bgr: np.ndarray, *,
                 device: torch.device | str = "cpu", tta: str = "none", sliding_window: int = 0) -> np.ndarray:
    """Train-id mask (``H x W`` uint8) of one BGR uint8 image at its own size."""
    with torch.inference_mode():
        logits = predict_logits(model, to_input_tensor(image_bgr).to(device), tta=tta,
                                sliding_window=sliding_window)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def predict_images(model: nn.Module, classes: ClassInfo, files: list[Path], root: Path, out_dir: str | Path, *,
                   device: torch.device | str = "cpu", tta: str = "none", sliding_window: int = 0,
                   num_logged: int = 4, backend: str = "eager") -> PredictReport:
    """Predict each image and write ``out_dir/{mask,color,overlay}/<path relative to root>.png``.

    Unreadable files are skipped with one warning that lists them. When an MLflow run is active, the first
    ``num_logged`` overlays are logged into it. ``backend`` is as in :func:`segmentation.evaluate.build_runner`.

    Raises:
        ValueError: none of the images could be read, two inputs map to the same output name, or bad ``tta``.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}; allowed: {', '.join(TTA_MODES)}")
    out_dir = Path(out_dir)
    stems = _output_stems(files, root)
    runner = build_runner(model, backend, device)
    report = PredictReport(out_dir)
    logged: list[tuple[str, np.ndarray]] = []
    for source, stem in zip(files, stems, strict=True):
        # IMREAD_COLOR turns grey, 16-bit and RGBA inputs into the 8-bit BGR the model expects.
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            report.skipped.append(source)
            continue
        mask = predict_mask(runner, image, device=device, tta=tta, sliding_window=sliding_window)
        blended = overlay(image, mask, classes)
        pictures = {"mask": mask, "color": colorize(mask, classes)[..., ::-1], "overlay": blended}
        for kind, picture in pictures.items():
            target = out_dir / kind / stem.with_suffix(".png")
            _write_png(target, picture)
            report.outputs[kind].append(target)
        if len(logged) < num_logged:
            logged.append((str(stem), blended[..., ::-1]))
    if report.skipped:
        logger.warning("skipped %d unreadable image(s): %s", len(report.skipped),
                       ", ".join(str(p) for p in report.skipped))
    if not report.outputs["mask"]:
        raise ValueError(f"none of the {len(files)} input image(s) could be read: "
                         f"{', '.join(str(p) for p in report.skipped)}")
    if logged:
        from segmentation.eval_logging import log_overlays  # the only MLflow dependency of prediction

        report.logged = log_overlays(logged)
    return report


def run_predict(model_uri: str, input_spec: str | Path, out_dir: str | Path, *, device: str = "auto",
                tta: str = "none", sliding_window: int = 0, num_logged: int = 4,
                backend: str = "eager") -> PredictReport:
    """Resolve the inputs (before the model is loaded, so a typo fails fast), load the model, predict.

    Args:
        model_uri: anything :func:`segmentation.export.load_model` accepts.
        input_spec: a folder (searched recursively), a glob pattern or one image file.
        out_dir: where ``mask/``, ``color/`` and ``overlay/`` are written.
        device: ``auto``, ``cpu``, ``cuda``, ...
        tta, sliding_window: see :func:`segmentation.evaluate.predict_logits`.
        num_logged: overlays logged into the run started by ``mlflow run``, if any.
        backend: see :func:`segmentation.evaluate.build_runner`.

    Returns:
        A :class:`PredictReport`.

    Raises:
        FileNotFoundError: the input does not exist or the model URI is a missing path.
        ValueError: no images, none readable, or a model URI that does not resolve.
    """
    from segmentation.eval_logging import attached_run
    from segmentation.export import load_model

    files, root = collect_images(input_spec)
    # An out_dir inside the input folder must not feed the previous run's PNGs back in as inputs.
    out_resolved = Path(out_dir).resolve()
    files = [f for f in files if not f.resolve().is_relative_to(out_resolved)]
    if not files:
        raise ValueError(f"the only images under {input_spec!r} are earlier outputs in {out_dir}")
    model, classes = load_model(model_uri)
    with attached_run(create=False):  # under `mlflow run`, overlays go into its run; plain calls create none
        return predict_images(model, classes, files, root, out_dir, device=resolve_device(device), tta=tta,
                              sliding_window=sliding_window, num_logged=num_logged, backend=backend)
