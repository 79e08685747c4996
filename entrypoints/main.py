"""`mlflow run .` — the whole pipeline (preprocess -> train -> evaluate -> export -> promote) as child runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from entrypoints._cli import str2bool
from segmentation.pipeline import PipelineParams, run_pipeline, start_parent_run
from segmentation.tracking import check_tracking_server


def get_args_parser() -> argparse.ArgumentParser:
    defaults = PipelineParams()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default=defaults.dataset, help="synthetic | cityscapes | cvat")
    parser.add_argument("--raw-dir", default=defaults.raw_dir, help="raw dataset folder (not for synthetic)")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="where preprocess writes masks and split table")
    parser.add_argument("--config", default=defaults.config)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--registered-model", default=defaults.registered_model)
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="synthetic dataset size")
    parser.add_argument("--num-processes", type=int, default=defaults.num_processes)
    parser.add_argument("--overrides", default=defaults.overrides, help="dotted key=value config overrides for train")
    parser.add_argument("--reuse", type=str2bool, default=defaults.reuse, help="reuse FINISHED steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    params = PipelineParams(
        dataset=args.dataset,
        raw_dir=args.raw_dir,
        data_dir=args.data_dir,
        config=args.config,
        lr=args.lr,
        registered_model=args.registered_model,
        num_processes=args.num_processes,
        reuse=args.reuse,
    )
    try:
        check_tracking_server()
    except ConnectionError as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 2
    with start_parent_run():
        steps = run_pipeline(params)
    print(json.dumps(steps, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
