"""Cost of logging one model to a tracking server: the code it carries, in files, seconds and server CPU.

    python -m benchmarks.model_logging [--models 5] [--rounds 3]

Every logged model (each kept training checkpoint, each export format, each registration) is a models-from-code
pyfunc that carries ``segmentation`` code as ``code_paths`` (one artifact upload per file). This logs the same
random FC-HarDNet (19 classes) to a local ``mlflow server`` (sqlite, proxied artifacts, the same cores), alternating
two variants in rounds:

- ``served code``: what the project logs, the modules serving imports
  (:func:`segmentation.mlops.model_store.served_code_files`);
- ``whole package``: every ``segmentation`` module, as models were logged before.

Reported per model: artifact files, wall time and CPU of the logging process, and the server's CPU (the server and
its uvicorn worker). Wall and CPU include MLflow's own check of the input example (it loads the model and predicts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import describe_machine, markdown_table, write_results
from benchmarks.inference import isa_tag
from benchmarks.tracking import process_cpu, start_server

VARIANTS = ("served code", "whole package")


def _copy_whole_package(destination: Path) -> Path:
    from segmentation.mlops import model_store

    return shutil.copytree(
        model_store.CODE_DIR, destination / "segmentation", ignore=shutil.ignore_patterns("__pycache__")
    )


def log_models(variant: str, count: int, server_pid: int) -> dict:
    import mlflow
    import torch

    from segmentation.config import ModelConfig
    from segmentation.data.classes import ClassInfo
    from segmentation.mlops import model_store
    from segmentation.models import FCHarDNet

    torch.manual_seed(0)
    model, classes = FCHarDNet(num_classes=19).eval(), ClassInfo.cityscapes()
    served = model_store.copy_served_code
    if variant == "whole package":
        model_store.copy_served_code = _copy_whole_package
    try:
        with mlflow.start_run():
            wall, cpu, server = time.perf_counter(), time.process_time(), process_cpu(server_pid)
            for index in range(count):
                model_store.log_pytorch_model(model, classes, ModelConfig(), name=f"m{index}")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            server = process_cpu(server_pid) - server
    finally:
        model_store.copy_served_code = served
    with tempfile.TemporaryDirectory() as tmp:
        code = (_copy_whole_package if variant == "whole package" else served)(Path(tmp))
        code_files = sum(1 for _ in code.rglob("*.py"))
    return {
        "variant": variant,
        "code files": code_files,
        "wall s": wall / count,
        "client CPU s": cpu / count,
        "server CPU s": server / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=5, help="models logged per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both variants")
    args = parser.parse_args(argv)
    print(describe_machine() + f", vector ISA: {isa_tag()}")

    import mlflow

    workdir = Path(tempfile.mkdtemp(prefix="bench-model-logging-"))
    proc, uri = start_server(workdir)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("model-logging")
        log_models("served code", 1, proc.pid)  # warm-up: imports, first export
        samples: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                samples[variant].append(log_models(variant, args.models, proc.pid))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for variant, runs in samples.items():
        row = {"variant": variant, "code files": runs[0]["code files"]}
        for key in ("wall s", "client CPU s", "server CPU s"):
            row[key] = round(statistics.median(r[key] for r in runs), 2)
            row[f"{key} range"] = f"{min(r[key] for r in runs):.2f}-{max(r[key] for r in runs):.2f}"
        rows.append(row)
    columns = ["variant", "code files", "wall s", "wall s range", "client CPU s", "server CPU s", "server CPU s range"]
    print(f"\nper logged model, median of {args.rounds} rounds of {args.models} models:")
    print(markdown_table(rows, columns))
    path = write_results("model_logging", rows, {"models": args.models, "rounds": args.rounds})
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
