"""``preprocess`` step: a Cityscapes tree, a CVAT export or the built-in synthetic scenes -> masks + split table.

    python -m entrypoints.preprocess --dataset cvat --raw-dir data/raw/my_export --out-dir data/my_export
    mlflow run . -e preprocess --env-manager local -P dataset=cityscapes -P raw_dir=/data/cityscapes

Under ``mlflow run`` the table, pixel counts and overlays are logged into the step's run.
"""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run
from segmentation.data.preprocess import DATASETS
from segmentation.steps.preprocess import preprocess_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic")
    parser.add_argument("--raw-dir", default="", help="source folder (unused for synthetic)")
    parser.add_argument("--out-dir", default="data/synthetic", help="output folder (split/, images/, interim/)")
    parser.add_argument("--split-id", default="split01")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="used where the source defines no split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=200, help="synthetic only")
    parser.add_argument("--height", type=int, default=128, help="synthetic only")
    parser.add_argument("--width", type=int, default=256, help="synthetic only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        table = preprocess_step(
            args.dataset,
            args.raw_dir,
            args.out_dir,
            split_id=args.split_id,
            val_fraction=args.val_fraction,
            seed=args.seed,
            num_images=args.num_images,
            height=args.height,
            width=args.width,
        )
        print(f"wrote {table}")

    return run("preprocess", step)


if __name__ == "__main__":
    sys.exit(main())
