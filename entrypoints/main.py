"""`mlflow run .` — the whole pipeline (preprocess -> train -> evaluate -> export -> promote) as child runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from entrypoints._cli import run, str2bool
from segmentation.steps.main import PipelineParams, pipeline_step


def get_args_parser() -> argparse.ArgumentParser:
    defaults = PipelineParams()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default=defaults.dataset, help="synthetic | cityscapes | cvat")
    parser.add_argument("--raw-dir", default=defaults.raw_dir, help="raw dataset folder (not for synthetic)")
    parser.add_argument("--data-dir", default=defaults.data_dir, help="where preprocess writes masks and split table")
    parser.add_argument("--config", default=defaults.config)
    parser.add_argument("--lr", default=defaults.lr, help="train.lr; empty keeps the config's")
    parser.add_argument("--registered-model", default=defaults.registered_model)
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="synthetic dataset size")
    parser.add_argument("--num-processes", type=int, default=defaults.num_processes)
    parser.add_argument("--overrides", default=defaults.overrides, help="dotted key=value config overrides for train")
    parser.add_argument("--reuse", type=str2bool, default=defaults.reuse, help="reuse FINISHED steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # Every parsed flag becomes a field: a flag without a field (or the reverse) fails here, none is dropped.
    params = PipelineParams(**vars(args))
    assert set(vars(args)) == {f.name for f in dataclasses.fields(PipelineParams)}  # internal invariant
    return run("main", lambda: print(json.dumps(pipeline_step(params), indent=2)))


if __name__ == "__main__":
    sys.exit(main())
