"""``train`` step: Accelerate training tracked in one MLflow run; the best weights become a registered model.

    mlflow run . -e train --env-manager local -P config=configs/tiny.yaml -P data=data/synthetic
    python -m entrypoints.train --config configs/tiny.yaml --num-processes 2     # 2 ranks via accelerate launch
    accelerate launch --num_processes 8 -m entrypoints.train --config configs/hardnet_cityscapes.yaml

``--lr/--epochs/--batch-size`` override the config unless they equal the MLproject defaults (those of
``configs/hardnet_cityscapes.yaml``); ``--overrides "train.max_steps=100 loss.min_k=512"`` sets any key.

Exit codes: 0 trained and fully tracked; 2 bad input or unreachable server at start (nothing trained);
3 (``EXIT_TRACKING_INCOMPLETE``) trained, checkpoints and model saved locally, but the tracking server did not get
everything before ``--tracking-timeout``: the message names the journal to upload with
``python -m entrypoints.sync_tracking <journal dir>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from segmentation.config import CONFIG_DIR, Config, load_config

DEFAULT_CONFIG = "configs/hardnet_cityscapes.yaml"
EXIT_TRACKING_INCOMPLETE = 3
FLAG_KEYS = {"lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML recipe (see configs/)")
    parser.add_argument("--data", default="", help="preprocess out_dir or split table; empty keeps data.root")
    parser.add_argument("--lr", type=float, default=None, help="train.lr")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size (per process)")
    parser.add_argument("--num-processes", type=int, default=1, help="> 1 re-launches under accelerate launch")
    parser.add_argument("--overrides", default="", help='dotted key=value list, e.g. "train.max_steps=100"')
    parser.add_argument("--resume", default="", help="MLflow run id to continue from its last checkpoint")
    parser.add_argument("--registered-model", default="fchardnet", help="registered model name; empty: none")
    parser.add_argument("--experiment", default=None, help="experiment name (ignored under `mlflow run`)")
    parser.add_argument("--tracking-timeout", type=float, default=120.0,
                        help="seconds to wait at the end for a slow or down tracking server (then exit code 3)")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file, then ``--data/--lr/--epochs/--batch-size`` where they differ from the defaults, then
    ``--overrides`` (last word)."""
    recipe = load_config(CONFIG_DIR / os.path.basename(DEFAULT_CONFIG))
    flags = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        section, name = key.split(".")
        if value is not None and value != getattr(getattr(recipe, section), name):
            flags.append(f"{key}={value}")
    if args.data:
        flags.append(f"data.root={args.data}")
    return load_config(args.config, flags + args.overrides.split())


def _inside_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def relaunch(num_processes: int, argv: list[str], cpu: bool) -> int:
    """Run this script under ``accelerate launch`` with ``num_processes`` ranks (gloo on CPU); its exit code."""
    import socket

    import torch

    with socket.socket() as sock:  # a free rendezvous port, so that concurrent trainings do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(num_processes), "--main_process_port", str(port), "--dynamo_backend", "no"]
    if cpu or not torch.cuda.is_available():
        # `--cpu --num_processes N` would start one process; --multi_gpu + ACCELERATE_USE_CPU gives N gloo ranks.
        cmd += ["--mixed_precision", "no"]
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run([*cmd, "-m", "entrypoints.train", *argv], env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train failed: {exc}", file=sys.stderr)
        return 2
    if args.num_processes > 1 and not _inside_launch():
        return relaunch(args.num_processes, argv, cpu=cfg.system.cpu)
    from segmentation.engine import fit
    from segmentation.tracking import TrackingIncompleteError

    try:
        result = fit(cfg, resume_run_id=args.resume or None, experiment=args.experiment,
                     registered_model=args.registered_model or None, tracking_timeout=args.tracking_timeout)
    except (ValueError, FileNotFoundError, ConnectionError, FloatingPointError) as exc:
        print(f"train failed: {exc}", file=sys.stderr)
        return 2
    except TrackingIncompleteError as exc:
        print(f"train: tracking incomplete: {exc}", file=sys.stderr)
        return EXIT_TRACKING_INCOMPLETE
    logging.getLogger(__name__).info("run %s finished at step %d: %s", result.run_id, result.global_step,
                                     {k: round(v, 4) for k, v in result.metrics.items() if "/IoU/" not in k})
    return 0


if __name__ == "__main__":
    sys.exit(main())
