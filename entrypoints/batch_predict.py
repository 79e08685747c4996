"""`mlflow run . -e batch_predict`: score a folder or glob of images on Spark with a logged model's pyfunc."""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run, str2bool
from segmentation.steps.batch_predict import DEFAULT_MASTER, ENV_MANAGERS, batch_predict_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-uri", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, runs:/")
    parser.add_argument("--input", required=True, help="a folder (recursive), one file, DIR/*.png or DIR/**/*.png")
    parser.add_argument("--output", required=True, help="mask/, color/ and predictions.parquet are written here")
    parser.add_argument(
        "--master", default=DEFAULT_MASTER, help="local[2], spark://host:7077, ...; empty: spark-submit's"
    )
    parser.add_argument("--colorize", type=str2bool, default=False, help="also write colour masks under color/")
    parser.add_argument("--cityscapes", type=str2bool, default=False, help="also the benchmark's labelIds results")
    parser.add_argument("--env-manager", default="local", choices=ENV_MANAGERS, help="spark_udf's model environment")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call of the model on an executor")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def step() -> None:
        report = batch_predict_step(
            args.model_uri,
            args.input,
            args.output,
            master=args.master,
            colorize=args.colorize,
            cityscapes=args.cityscapes,
            env_manager=args.env_manager,
            batch_size=args.batch_size,
        )
        print(
            f"scored {report.images - report.failed} of {report.images} file(s) in {report.seconds:.1f} s "
            f"({report.images_per_s:.2f} images/s); {report.failed} refused; table: {report.table}"
        )

    return run("batch_predict", step)


if __name__ == "__main__":
    sys.exit(main())
