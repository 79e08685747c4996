"""The runs behind the README's pictures, made with the commands the README gives users.

    python -m scripts.readme_runs --tracking-uri http://127.0.0.1:5000 --workdir /tmp/readme-runs

Against a running tracking server, in this order (each a real ``mlflow run . --env-manager local``):

1. ``pipeline``: the default pipeline (``mlflow run .``: synthetic data, ``configs/synthetic.yaml``, evaluate,
   export, promote), timed; its registered model ``fchardnet-synthetic`` is the one the model pages show.
2. ``lr-sweep``: three ``train`` runs of the same recipe at lr 0.005, 0.02 and 0.08 (the README's bash loop).
3. ``sweep``: an Optuna sweep (``-e sweep``) of ``configs/sweeps/synthetic.yaml`` with shorter trials.
4. ``export``: the registered version exported as ``onnx,onnx-int8`` with the accuracy-and-latency table.

``python -m scripts.screenshots`` runs this (unless ``--no-runs``) and then photographs the UI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "fchardnet-synthetic"
EXPERIMENTS = {"pipeline": "pipeline", "lr_sweep": "lr-sweep", "sweep": "sweep"}
LRS = ("0.005", "0.02", "0.08")
# Shorter trials than the recipe's 300 steps so that six fit in a few minutes; the pruner still sees 4+ points.
SWEEP_OVERRIDES = "train.max_steps=150 train.val_every_n_steps=25"


def _env(uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)  # a caller's active run must not swallow these
    return env


def mlflow_run(
    uri: str, entry_point: str, experiment: str, params: dict[str, str], log: Path, run_name: str = ""
) -> float:
    """``mlflow run . -e <entry_point> --env-manager local`` into ``experiment``; returns its wall time in seconds.

    Raises:
        RuntimeError: the run failed; the message holds the tail of its output.
    """
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    cmd += ["--experiment-name", experiment] + (["--run-name", run_name] if run_name else [])
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=REPO, env=_env(uri), stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - start
    if code.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code.returncode}):\n{log.read_text()[-5000:]}")
    return seconds


def make_runs(uri: str, workdir: Path, n_trials: int = 6) -> dict[str, float]:
    """Every run the README pictures show; returns the wall time of each group in seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data" / "synthetic"
    times = {}
    times["pipeline"] = mlflow_run(
        uri, "main", EXPERIMENTS["pipeline"], {"data_dir": str(data)}, workdir / "pipeline.log"
    )
    start = time.monotonic()
    for lr in LRS:
        params = {"config": "configs/synthetic.yaml", "data": str(data), "lr": lr, "registered_model": ""}
        mlflow_run(uri, "train", EXPERIMENTS["lr_sweep"], params, workdir / f"train-lr{lr}.log", f"lr={lr}")
    times["lr_sweep"] = time.monotonic() - start
    sweep = {
        "space": "configs/sweeps/synthetic.yaml",
        "n_trials": str(n_trials),
        "study": "readme",
        "storage": f"sqlite:///{workdir / 'optuna.db'}",
        "data": str(data),
        "overrides": SWEEP_OVERRIDES,
        "registered_model": f"{MODEL}-sweep",
    }
    times["sweep"] = mlflow_run(uri, "sweep", EXPERIMENTS["sweep"], sweep, workdir / "sweep.log")
    export = {
        "model_uri": f"models:/{MODEL}@production",
        "format": "onnx,onnx-int8",
        "registered_model": f"{MODEL}-onnx",
        "data": str(data),
    }
    times["export"] = mlflow_run(uri, "export", EXPERIMENTS["pipeline"], export, workdir / "export.log")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="a running tracking server")
    parser.add_argument("--workdir", required=True, help="data, logs and the Optuna study go here")
    parser.add_argument("--n-trials", type=int, default=6, help="trials of the Optuna sweep")
    args = parser.parse_args(argv)
    times = make_runs(args.tracking_uri.rstrip("/"), Path(args.workdir), args.n_trials)
    print(json.dumps({key: round(value, 1) for key, value in times.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
