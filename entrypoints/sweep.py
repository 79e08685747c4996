"""``sweep`` step: an Optuna hyperparameter search; every trial trains like ``train``, in an MLflow child run.

mlflow run . -e sweep --env-manager local -P space=configs/sweeps/synthetic.yaml -P n_trials=20 -P study=synth-1
Start the same command on more processes or machines (same study and storage) to search in parallel.
"""

from __future__ import annotations

import argparse
import sys

from entrypoints._cli import run
from segmentation.steps.sweep import SweepParams, sweep_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="configs/sweeps/synthetic.yaml", help="search-space YAML")
    parser.add_argument("--n-trials", type=int, default=20, help="finished trials the study needs, all workers")
    parser.add_argument("--study", default="", help="Optuna study name; empty: the space file's name")
    parser.add_argument("--storage", default="", help="Optuna storage URL; empty: optuna.db beside the store")
    parser.add_argument("--config", default="configs/synthetic.yaml", help="YAML recipe every trial starts from")
    parser.add_argument("--data", default="", help="preprocess out_dir or split table; empty keeps data.root")
    parser.add_argument("--overrides", default="", help='dotted key=value list for every trial, "train.max_steps=100"')
    parser.add_argument("--registered-model", default="fchardnet", help="register the best trial here; empty: no")
    parser.add_argument("--heartbeat-interval", type=int, default=10, help="seconds between a trial's heartbeats")
    parser.add_argument("--grace-period", type=int, default=60, help="seconds without heartbeat: trial lost")
    parser.add_argument("--experiment", default=None, help="experiment name (ignored under `mlflow run`)")
    parser.add_argument("--tracking-timeout", type=float, default=120.0, help="seconds to wait for the server")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    params = SweepParams(**{key: value for key, value in vars(args).items()})

    def step() -> None:
        sweep_step(params)

    return run("sweep", step)


if __name__ == "__main__":
    sys.exit(main())
