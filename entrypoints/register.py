"""`mlflow run . -e register`: released FC-HarDNet weights become a registered model version.

mlflow run . -e register --env-manager local -P checkpoint=hardnet70_cityscapes_model.pkl -P registered_model=fchardnet
"""

from __future__ import annotations

import argparse
import json
import sys

from entrypoints._cli import run
from segmentation.steps.register import BUILT_IN_CLASSES, register_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="released .pkl (model_state) or a plain state_dict file")
    parser.add_argument("--registered-model", required=True, help="registry name; a new version is created")
    parser.add_argument("--classes", default=BUILT_IN_CLASSES, help="'cityscapes' or a classes.csv (id,name,r,g,b)")
    parser.add_argument("--arch", default="fchardnet70", help="model.arch of the weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        print(json.dumps(register_step(args.checkpoint, args.registered_model, args.classes, args.arch), indent=2))

    return run("register", step)


if __name__ == "__main__":
    sys.exit(main())
