"""The ``predict`` step: masks, colour masks and overlays for a folder, a glob or one image, with any model."""

from __future__ import annotations

from pathlib import Path

from segmentation.inference.files import PredictReport, check_out_dir, collect_images, predict_images
from segmentation.inference.predictor import DEFAULT_BACKEND, Predictor, resolve_device
from segmentation.mlops.eval_logging import log_overlays
from segmentation.mlops.model_store import load_model
from segmentation.mlops.runs import attached_run
from segmentation.mlops.serving_requests import load_limits


def predict_step(
    model_uri: str,
    input_spec: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    tta: str = "none",
    sliding_window: int = 0,
    num_logged: int = 4,
    backend: str = DEFAULT_BACKEND,
) -> PredictReport:
    """Resolve the inputs (before the model is loaded, so a typo fails fast), load the model, predict.

    Each image is held to serving's per-image pixel limit (``SEGMENTATION_MAX_PIXELS``, read as serving and
    ``batch_predict`` read it), checked from PNG/JPEG headers before decoding. A file that cannot be read, is
    truncated or is over the limit is skipped and named in ``report.skipped`` with the reason; the others are
    predicted, as ``batch_predict`` records an error for such a row and goes on.

    Args:
        model_uri: anything :func:`segmentation.mlops.model_store.load_model` accepts.
        input_spec: a folder (searched recursively), a glob pattern or one image file.
        out_dir: where ``mask/``, ``color/`` and ``overlay/`` are written.
        device: ``auto``, ``cpu``, ``cuda``, ...
        tta, sliding_window: see :func:`segmentation.inference.tta.predict_logits`.
        num_logged: overlays logged into the run started by ``mlflow run``, if any.
        backend: the :class:`~segmentation.inference.predictor.Predictor` backend.

    Returns:
        A :class:`~segmentation.inference.files.PredictReport`.

    Raises:
        FileNotFoundError: the input does not exist or the model URI is a missing path.
        ValueError: no images, none readable, a model URI that does not resolve, or a bad limit in the environment.
    """
    check_out_dir(out_dir)  # before the model is loaded, like the inputs
    max_pixels = load_limits().max_pixels
    files, root = collect_images(input_spec)
    # An out_dir inside the input folder must not feed the previous run's PNGs back in as inputs.
    out_resolved = Path(out_dir).resolve()
    files = [f for f in files if not f.resolve().is_relative_to(out_resolved)]
    if not files:
        raise ValueError(f"the only images under {input_spec!r} are earlier outputs in {out_dir}")
    model, classes = load_model(model_uri)
    predictor = Predictor(model.to(resolve_device(device)), backend)
    with attached_run(create=False):  # under `mlflow run`, overlays go into its run; plain calls create none
        report = predict_images(
            predictor,
            classes,
            files,
            root,
            out_dir,
            tta=tta,
            sliding_window=sliding_window,
            num_overlays=num_logged,
            max_pixels=max_pixels,
        )
        report.logged = log_overlays(report.overlays)
    return report
