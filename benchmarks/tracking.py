"""Tracking overhead: wall time of the same short training with MLflow logging to a local server, and without.

    python -m benchmarks.tracking [--steps 16] [--repeats 3]

Runs ``fit`` in this process on a synthetic 64x128 dataset (configs/tiny.yaml: a metric batch every step, validation
with images and a checkpoint every ``--val-every`` steps), alternating tracked (``track=True``, a local
``mlflow server`` on sqlite) and untracked (``track=False``) runs. Model logging is off in both: it is a one-off
export, not a per-step cost. Also reports the time the training thread spent inside tracker calls, split into the
loop (metrics, images, queued uploads) and the end (waiting for the journal to reach the server).
Target (issue 9): overhead <= 2 % of training wall time.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import describe_machine, markdown_table, peak_rss_mib, write_results

TIMED = ("log_config", "log_params", "set_tags", "log_dataset", "skip_logged_steps", "open_journal", "log_metrics",
         "log_image", "log_artifacts", "delete_artifacts", "end")


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=workdir, env=env,
                            stdout=(workdir / "server.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise TimeoutError(f"mlflow server did not start; see {workdir / 'server.log'}")


def instrument(tracker_cls) -> dict[str, float]:
    """Accumulate the seconds the calling (training) thread spends in each timed Tracker method."""
    spent: dict[str, float] = {}

    def timed(name, method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    for name in TIMED:
        setattr(tracker_cls, name, timed(name, getattr(tracker_cls, name)))
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--val-every", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from segmentation import tracking
    from segmentation.config import CONFIG_DIR, load_config
    from segmentation.data.preprocess import run_preprocess
    from segmentation.engine import fit

    spent = instrument(tracking.Tracker)
    work = Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    (work / "server").mkdir()
    proc, uri = start_server(work / "server")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_preprocess("synthetic", "", work / "data", num_images=5, height=64, width=128, val_fraction=0.2)
        cfg = load_config(CONFIG_DIR / "tiny.yaml", [
            f"data.root={work / 'data'}", "train.epochs=0", f"train.max_steps={args.steps}",
            f"train.val_every_n_steps={args.val_every}", "train.log_every_n_steps=1",
            f"train.output_dir={work / 'out'}"])
        fit(cfg, track=False)  # warm-up: imports, allocator, first-call costs
        walls: dict[bool, list[float]] = {True: [], False: []}
        shares = []
        for _ in range(args.repeats):
            for track in (False, True):
                spent.clear()
                t0 = time.perf_counter()
                fit(cfg, track=track, log_model=False, experiment="bench-tracking")
                wall = time.perf_counter() - t0
                walls[track].append(wall)
                if track:
                    shares.append({"loop": sum(v for k, v in spent.items() if k != "end"),
                                   "end": spent.get("end", 0.0), "wall": wall})
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    loop = statistics.median(s["loop"] / s["wall"] for s in shares) * 100
    end = statistics.median(s["end"] / s["wall"] for s in shares) * 100
    rows = [{"tracking": "off", "median_s": off, "min_s": min(walls[False]), "max_s": max(walls[False])},
            {"tracking": "on (local server)", "median_s": on, "min_s": min(walls[True]), "max_s": max(walls[True]),
             "overhead_%": (on - off) / off * 100, "in_tracker_loop_%": loop, "in_tracker_end_%": end}]
    print(describe_machine())
    print(f"{args.steps} steps of configs/tiny.yaml (64x128, batch 2), validation + checkpoint every "
          f"{args.val_every} steps, {args.repeats} repeats; peak RSS {peak_rss_mib():.0f} MiB\n")
    print(markdown_table(rows, ["tracking", "median_s", "min_s", "max_s", "overhead_%", "in_tracker_loop_%",
                                "in_tracker_end_%"]))
    target = rows[1]["overhead_%"] <= 2.0
    print(f"\nTarget overhead <= 2 %: {'met' if target else 'NOT met'} ({rows[1]['overhead_%']:.1f} %)")
    path = write_results("tracking", rows, {"steps": args.steps, "val_every": args.val_every,
                                            "repeats": args.repeats, "walls": {str(k): v for k, v in walls.items()},
                                            "target_met": target})
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
