"""`mlflow run . -e export`: ONNX export with BN fused and checked against PyTorch; INT8 / FP16 copies scored against
PyTorch fp32 on the evaluation split; every format that passes the accuracy gate registered as a serving model."""

from __future__ import annotations

import argparse
import json
import sys

from entrypoints._cli import run, str2bool
from segmentation.steps.export import FORMATS, export_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True, help="runs:/, models:/<name>/<version>, models:/<name>@<alias>")
    parser.add_argument("--format", default="onnx", help=f"comma-separated list of: {', '.join(FORMATS)}")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--fuse-bn", type=str2bool, default=True, help="fold BatchNorm into the convs before export")
    parser.add_argument("--registered-model", default="", help="name of the ONNX model; INT8/FP16 add -int8/-fp16")
    parser.add_argument("--data", default="", help="preprocess out_dir: INT8 calibration and the accuracy gate")
    parser.add_argument("--calibration-images", type=int, default=8, help="training images that calibrate INT8")
    parser.add_argument("--max-miou-drop", type=float, default=0.5, help="mIoU points a format may lose")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        result = export_step(
            args.model_uri,
            args.format,
            args.opset,
            args.fuse_bn,
            args.registered_model,
            data=args.data,
            calibration_images=args.calibration_images,
            max_miou_drop=args.max_miou_drop,
        )
        print(json.dumps(result, indent=2, default=str))

    return run("export", step)


if __name__ == "__main__":
    sys.exit(main())
