"""`mlflow run . -e export`: ONNX export with BN fused, parity check against PyTorch, serving model registered."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from entrypoints._cli import str2bool
from segmentation.export import ParityError, run_export


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True,
                        help="runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> or a folder")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--fuse-bn", type=str2bool, default=True, help="fold BatchNorm into the convs before export")
    parser.add_argument("--registered-model", default="", help="register the ONNX serving model under this name")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        result = run_export(args.model_uri, args.format, args.opset, args.fuse_bn, args.registered_model)
    except (ParityError, ValueError, FileNotFoundError) as exc:
        logging.getLogger("export").error("%s", exc)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
