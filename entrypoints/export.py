"""`mlflow run . -e export`: ONNX export with BN fused, parity check against PyTorch, serving model registered."""

from __future__ import annotations

import argparse
import json
import sys

from entrypoints._cli import run, str2bool
from segmentation.steps.export import FORMATS, export_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True, help="runs:/, models:/<name>/<version>, models:/<name>@<alias>")
    parser.add_argument("--format", default="onnx", choices=FORMATS)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--fuse-bn", type=str2bool, default=True, help="fold BatchNorm into the convs before export")
    parser.add_argument("--registered-model", default="", help="register the ONNX serving model under this name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        result = export_step(args.model_uri, args.format, args.opset, args.fuse_bn, args.registered_model)
        print(json.dumps(result, indent=2))

    return run("export", step)


if __name__ == "__main__":
    sys.exit(main())
