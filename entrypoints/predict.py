"""`mlflow run . -e predict`: train-id mask, colourised mask and overlay PNGs for a folder or glob of images."""

from __future__ import annotations

import argparse
import logging
import sys

from segmentation.evaluate import TTA_MODES
from segmentation.predict import run_predict


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True,
                        help="runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> or a folder")
    parser.add_argument("--input", required=True, help="a folder (searched recursively), a glob or one image")
    parser.add_argument("--out-dir", required=True, help="mask/, color/ and overlay/ are written here")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--tta", default="none", choices=TTA_MODES)
    parser.add_argument("--sliding-window", type=int, default=0, help="window side (px) for large images; 0 = off")
    parser.add_argument("--backend", default="auto", choices=("eager", "auto", "channels_last", "onnxruntime"),
                        help="eager: the module as trained; others: the deployed path (BN folded)")
    parser.add_argument("--num-logged", type=int, default=4, help="overlays logged into the active MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        report = run_predict(args.model_uri, args.input, args.out_dir, device=args.device, tta=args.tta,
                             sliding_window=args.sliding_window, num_logged=args.num_logged,
                             backend=args.backend)
    except (ValueError, FileNotFoundError) as exc:
        logging.getLogger("predict").error("%s", exc)
        return 1
    print(f"wrote {len(report.outputs['mask'])} prediction(s) to {report.out_dir} "
          f"(mask/, color/, overlay/); skipped {len(report.skipped)} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
