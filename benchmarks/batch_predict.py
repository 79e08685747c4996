"""Batch prediction throughput: ``batch_predict`` on Spark local[1] and local[2] next to prediction in one process.

Run once: ``python -m benchmarks.batch_predict`` (10-15 minutes on 2 shared cores; needs Java 17+ for Spark).

The same images (64 synthetic 256x512 PNG street scenes) and the same model (a randomly initialised FC-HarDNet-70
with the 19 Cityscapes classes, logged with ``log_pytorch_model`` into a temporary sqlite store and registered with
alias ``production``; throughput does not depend on the weights) go through:

1. the serving pyfunc in this process (``mlflow.pyfunc.load_model`` once, not timed; then ``predict`` on batches
   of 8 base64 images and the masks written): the work an executor does per image;
2. the ``predict`` step in this process (model load included; it writes a mask, a colour mask and an overlay);
3. ``batch_predict`` with ``local[1]`` and ``local[2]``: the scoring job (Python workers starting, the model loaded
   in each task, the file checks, scoring and writing), the whole call (Spark's start-up added), and the cost per
   extra image: a job on a quarter of the images runs first, and the difference between the two jobs removes the
   fixed part.

Each row is the median of ``--repeats`` runs. Spark gives each task one core (``OMP_NUM_THREADS=1``), while the
in-process rows use all of torch's threads.
Prints a markdown table and writes ``benchmarks/results/batch_predict.json``.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import cv2
import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient

from benchmarks.common import describe_machine, markdown_table, write_results
from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.data.synthetic import generate_scene
from segmentation.io import write_bytes_atomic
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.models import FCHarDNet
from segmentation.steps.batch_predict import batch_predict_step
from segmentation.steps.predict import predict_step

MODEL = "bench-batch-predict"
COLUMNS = ["what", "images", "seconds", "images_per_s", "load", "note"]


def make_images(folder: Path, count: int, height: int, width: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image, _ = generate_scene(height, width, seed=i)
        paths.append(folder / f"scene_{i:03d}.png")
        cv2.imwrite(str(paths[-1]), image)
    return paths


def register(tracking_uri: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    torch.manual_seed(0)
    classes = ClassInfo.cityscapes()
    with mlflow.start_run():
        info = log_pytorch_model(
            FCHarDNet(num_classes=classes.num_classes).eval(),
            classes,
            ModelConfig(num_classes=classes.num_classes),
            registered_model_name=MODEL,
        )
    MlflowClient().set_registered_model_alias(MODEL, "production", info.registered_model_version)
    return f"models:/{MODEL}@production"


def pyfunc_in_process(model_uri: str, paths: list[Path], out: Path, batch_size: int) -> float:
    model = mlflow.pyfunc.load_model(model_uri)
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = paths[i : i + batch_size]
        request = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in batch]})
        for path, mask in zip(batch, model.predict(request)["mask"], strict=True):
            write_bytes_atomic(out / f"{path.stem}.png", base64.b64decode(mask))
    return time.perf_counter() - started


def row(what: str, images: int, seconds: float, note: str = "") -> dict:
    print(f"  {what}: {seconds:.1f} s, {images / seconds:.2f} images/s", flush=True)
    # The 1-minute load average when the row was measured: the machine is shared, and a row taken at load 8 on 2
    # cores got a fraction of them.
    load = round(os.getloadavg()[0], 1)
    return {
        "what": what,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "load": load,
        "note": note,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the table shows the median")
    args = parser.parse_args(argv)
    reps = args.repeats
    print(describe_machine(), flush=True)
    load_at_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        model_uri = register(os.environ["MLFLOW_TRACKING_URI"])
        paths = make_images(Path(tmp) / "images", args.images, args.height, args.width)
        n = len(paths)
        (Path(tmp) / "quarter").mkdir()
        for path in paths[: n // 4]:
            shutil.copy(path, Path(tmp) / "quarter" / path.name)
        timed = [pyfunc_in_process(model_uri, paths, Path(tmp) / "pyfunc", args.batch_size) for _ in range(reps)]
        rows.append(row("pyfunc in-process", n, median(timed), "model load excluded; masks written"))
        timed = []
        for _ in range(reps):
            started = time.perf_counter()
            predict_step(model_uri, Path(tmp) / "images", Path(tmp) / "predict", num_logged=0)
            timed.append(time.perf_counter() - started)
        rows.append(row("`predict` step", n, median(timed), "model load included; 3 PNGs/image"))

        def job(master: str, folder: str) -> tuple[float, float]:
            started = time.perf_counter()
            report = batch_predict_step(
                model_uri, str(Path(tmp) / folder), Path(tmp) / "out", master=master, batch_size=args.batch_size
            )
            return report.seconds, time.perf_counter() - started

        job("local[1]", "quarter")  # warm-up: the JVM starts once per process, its JIT and the OS caches warm up
        for master in ("local[1]", "local[2]"):
            # Jobs on a quarter of the images alternate with full ones: the difference is the per-image cost without
            # the fixed part (Python workers starting, the model loaded in each task).
            quarter, full = [], []
            for _ in range(reps):
                quarter.append(job(master, "quarter"))
                full.append(job(master, "images"))
            scoring, wall = median(t[0] for t in full), median(t[1] for t in full)
            extra = n - n // 4
            rows.append(row(f"`batch_predict` {master}: scoring job", n, scoring, "workers + model loads included"))
            rows.append(row(f"`batch_predict` {master}: whole call", n, wall, "Spark start-up included"))
            note = f"{n} minus {n // 4} images: the fixed part removed"
            rows.append(
                row(f"`batch_predict` {master}: per extra image", extra, scoring - median(t[0] for t in quarter), note)
            )
    load = {"loadavg_1min_start": load_at_start[0], "loadavg_1min_end": os.getloadavg()[0]}
    print(markdown_table(rows, COLUMNS))
    print(f"load average (1 min) at start {load['loadavg_1min_start']:.1f}, at end {load['loadavg_1min_end']:.1f}")
    print(f"results: {write_results('batch_predict', rows, {'images': f'{args.height}x{args.width}', **load})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
