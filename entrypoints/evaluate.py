"""`mlflow run . -e evaluate`: score a model on a whole split at full resolution, log it, optionally promote it."""

from __future__ import annotations

import argparse
import logging
import sys

from entrypoints._cli import str2bool
from segmentation.config import EvalConfig
from segmentation.eval_logging import Protocol, format_summary, run_evaluation
from segmentation.evaluate import TTA_MODES

BACKENDS = ("eager", "auto", "channels_last", "onnxruntime")


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.75,1.0,1.25, got {text!r}") \
            from None


def get_args_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig()  # the schema holds the only defaults of the eval settings
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True,
                        help="runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> or a folder")
    parser.add_argument("--data", required=True, help="preprocess output folder or a split table (.parquet)")
    parser.add_argument("--split", default="val", help="rows of the split table to evaluate")
    parser.add_argument("--split-id", default="split01", help="split table name under <data>/split/")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--tta", default=defaults.tta, choices=TTA_MODES)
    parser.add_argument("--scales", type=_scales, default=tuple(defaults.scales), help="multiscale factors")
    parser.add_argument("--sliding-window", type=int, default=defaults.sliding_window,
                        help="window side (px) for larger inputs; 0 = whole image")
    parser.add_argument("--num-worst", type=int, default=defaults.num_worst, help="lowest-mIoU images to log")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="eager: the module as trained; others: the deployed path (BN folded) of "
                             "segmentation.inference")
    parser.add_argument("--promote", type=str2bool, default=False,
                        help="give alias production to this version if it scores >= the current holder")
    parser.add_argument("--force", type=str2bool, default=False, help="with --promote: promote whatever the scores")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    protocol = Protocol(data=args.data, split=args.split, split_id=args.split_id, batch_size=args.batch_size,
                        tta=args.tta, scales=args.scales, sliding_window=args.sliding_window,
                        num_worst=args.num_worst, device=args.device, backend=args.backend)
    try:
        result, promotion = run_evaluation(args.model_uri, protocol, promote=args.promote, force=args.force)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("evaluate").error("%s", exc)
        return 1
    print(format_summary(result))
    if promotion is not None:
        print(f"promotion: {'PROMOTED' if promotion.promoted else 'not promoted'} - {promotion.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
