"""``train`` step: Accelerate training tracked in one MLflow run; the best weights become a registered model.

mlflow run . -e train --env-manager local -P config=configs/tiny.yaml -P data=data/synthetic -P lr=0.05
accelerate launch --num_processes 8 -m entrypoints.train --config configs/hardnet_cityscapes.yaml
"""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run
from segmentation.config_loading import resolve_train_config
from segmentation.steps.train import launch_train_step, train_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hardnet_cityscapes.yaml", help="YAML recipe (see configs/)")
    parser.add_argument("--data", default="", help="preprocess out_dir or split table; empty keeps data.root")
    parser.add_argument("--lr", default="", help="train.lr; empty keeps the config's")
    parser.add_argument("--epochs", default="", help="train.epochs; empty keeps the config's")
    parser.add_argument("--batch-size", default="", help="train.batch_size (per process); empty keeps the config's")
    parser.add_argument("--num-processes", type=int, default=1, help="> 1 re-launches under accelerate launch")
    parser.add_argument("--overrides", default="", help='dotted key=value list, e.g. "train.max_steps=100"')
    parser.add_argument("--resume", default="", help="MLflow run id to continue from its last checkpoint")
    parser.add_argument("--registered-model", default="fchardnet", help="registered model name; empty: none")
    parser.add_argument("--experiment", default=None, help="experiment name (ignored under `mlflow run`)")
    wait = "seconds to wait at the end for a slow or down tracking server (then exit code 3)"
    parser.add_argument("--tracking-timeout", type=float, default=120.0, help=wait)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)

    def step() -> int | None:
        cfg = resolve_train_config(
            args.config, args.data, args.overrides, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size
        )
        launched = launch_train_step(args.num_processes, cfg, ["entrypoints.train", *argv])
        if launched is None:
            train_step(
                cfg,
                resume_run_id=args.resume or None,
                experiment=args.experiment,
                registered_model=args.registered_model or None,
                tracking_timeout=args.tracking_timeout,
            )
        return launched

    return run("train", step)


if __name__ == "__main__":
    sys.exit(main())
