"""`mlflow run . -e predict`: train-id mask, colourised mask and overlay PNGs for a folder or glob of images."""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run
from segmentation.inference.predictor import BACKEND_CHOICES, DEFAULT_BACKEND
from segmentation.inference.tta import TTA_MODES
from segmentation.steps.predict import predict_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True, help="runs:/, models:/<name>/<version>, models:/<name>@<alias>")
    parser.add_argument("--input", required=True, help="a folder (searched recursively), a glob or one image")
    parser.add_argument("--out-dir", required=True, help="mask/, color/ and overlay/ are written here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--tta", default="none", choices=TTA_MODES)
    parser.add_argument("--sliding-window", type=int, default=0, help="window side (px) for large images; 0 = off")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKEND_CHOICES, help="the deployed path")
    parser.add_argument("--num-logged", type=int, default=4, help="overlays logged into the active MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        report = predict_step(
            args.model_uri,
            args.input,
            args.out_dir,
            device=args.device,
            tta=args.tta,
            sliding_window=args.sliding_window,
            num_logged=args.num_logged,
            backend=args.backend,
        )
        print(
            f"wrote {len(report.outputs['mask'])} prediction(s) to {report.out_dir} (mask/, color/, overlay/); "
            f"skipped {len(report.skipped)} unreadable"
        )

    return run("predict", step)


if __name__ == "__main__":
    sys.exit(main())
