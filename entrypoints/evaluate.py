"""`mlflow run . -e evaluate`: score a model on a whole split at full resolution, log it, optionally promote it."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from entrypoints._cli import float_list, run, str2bool
from segmentation.config import EvalConfig
from segmentation.evaluation.evaluate import format_summary
from segmentation.inference.predictor import BACKEND_CHOICES, DEFAULT_BACKEND
from segmentation.inference.tta import TTA_MODES
from segmentation.steps.evaluate import Protocol, evaluate_step


def get_args_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig()  # the schema holds the only defaults of the eval settings
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True, help="runs:/, models:/<name>/<version>, models:/<name>@<alias>")
    parser.add_argument("--data", required=True, help="preprocess output folder or a split table (.parquet)")
    parser.add_argument("--split", default="val", help="rows of the split table to evaluate")
    parser.add_argument("--split-id", default="split01", help="split table name under <data>/split/")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--tta", default=defaults.tta, choices=TTA_MODES)
    parser.add_argument("--scales", type=float_list, default=tuple(defaults.scales), help="multiscale factors")
    parser.add_argument("--sliding-window", type=int, default=defaults.sliding_window, help="window side; 0 = off")
    parser.add_argument("--num-worst", type=int, default=defaults.num_worst, help="lowest-mIoU images to log")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKEND_CHOICES, help="the deployed path")
    parser.add_argument("--promote", type=str2bool, default=False, help="alias production if it scores >= holder")
    parser.add_argument("--force", type=str2bool, default=False, help="with --promote: promote whatever the scores")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Protocol)})

    def step() -> None:
        result, promotion = evaluate_step(args.model_uri, protocol, promote=args.promote, force=args.force)
        print(format_summary(result))
        if promotion is not None:
            print(f"promotion: {'PROMOTED' if promotion.promoted else 'not promoted'} - {promotion.reason}")

    return run("evaluate", step)


if __name__ == "__main__":
    sys.exit(main())
