"""Serving latency: `mlflow models serve` of the PyTorch and the ONNX model against the in-process paths.

Run once: ``python -m benchmarks.serving`` (about 3-5 minutes on 2 cores; the 1024x2048 part is the slow one).

1. In-process forward latency of one image: the unfused eager module and the three
   :class:`segmentation.inference.Predictor` backends (eager, channels_last, onnxruntime; BatchNorm fused), at
   512x1024 and 1024x2048; then the served pyfunc's ``predict`` on one 512x1024 PNG request without HTTP.
2. A real ``mlflow models serve -m models:/<name>@production --env-manager local -w 1`` per model (registry in
   a temporary sqlite store), queried over HTTP with one 512x1024 PNG per request, one request at a time:
   p50/p95 latency and requests/s. The client runs on the same machine, so it shares the cores with the server.
   The PyTorch model serves through ``Predictor(backend="auto")``; the printed ratio is its p50 over the fastest
   in-process forward (target <= 1.25).

The network is randomly initialised (latency does not depend on the weights) unless ``--model-uri`` is given.
Prints a markdown table and writes ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import describe_machine, markdown_table, time_fn, write_results

SAMPLE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "cityscapes_sample"
    / "leftImg8bit"
    / "val"
    / "frankfurt"
    / "frankfurt_000000_000294_leftImg8bit.png"
)


def street_image(height: int, width: int) -> np.ndarray:
    """The Cityscapes sample resized when present; otherwise a smooth synthetic scene (PNG-compressible)."""
    if SAMPLE.is_file():
        return cv2.resize(cv2.imread(str(SAMPLE)), (width, height), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    return cv2.resize(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8), (width, height))


def in_process(model: torch.nn.Module, plan: list[tuple[int, int, int]]) -> list[dict]:
    """Median forward latency per inference path for each ``(height, width, timed repeats)`` in ``plan``: the
    unfused eager module and the three :class:`segmentation.inference.Predictor` backends (all BatchNorm-fused)."""
    from segmentation.inference.predictor import BACKENDS, Predictor

    paths = {"eager (unfused)": lambda x: model(x)}
    for backend in BACKENDS:
        paths[f"Predictor {backend}"] = Predictor(model, backend=backend).logits
    rows = []
    for height, width, repeats in plan:
        x = torch.randn(1, 3, height, width)
        for name, fn in paths.items():
            with torch.inference_mode():
                timing = time_fn(lambda fn=fn, x=x: fn(x), warmup=1, repeats=repeats)
            rows.append({"what": f"in-process {name}", "size": f"{height}x{width}", **timing})
            print(f"  {name} {height}x{width}: {timing['median_ms']:.0f} ms", flush=True)
    return rows


def in_process_request(model: torch.nn.Module, frame, repeats: int) -> dict:
    """The served PyTorch model's ``predict`` on one request, without HTTP: PNG decode, Predictor, PNG encode."""
    import pandas as pd

    from segmentation.config import ModelConfig
    from segmentation.data.classes import ClassInfo
    from segmentation.mlops.serving import SegmentationModel
    from segmentation.models.package import save_model_package

    with tempfile.TemporaryDirectory() as tmp:
        save_model_package(model, ClassInfo.cityscapes(), ModelConfig(), tmp)
        pyfunc = SegmentationModel().setup(tmp)
    request = pd.DataFrame(frame)
    timing = time_fn(lambda: pyfunc.predict(None, request), warmup=1, repeats=repeats)
    print(f"  pyfunc predict ({pyfunc.predictor.backend}): {timing['median_ms']:.0f} ms", flush=True)
    return {"what": f"in-process pyfunc predict ({pyfunc.predictor.backend})", "size": "512x1024", **timing}


def register(model: torch.nn.Module, tracking_uri: str) -> str:
    import mlflow

    from segmentation.config import ModelConfig
    from segmentation.data.classes import ClassInfo
    from segmentation.mlops.model_store import log_pytorch_model
    from segmentation.steps.export import export_step as run_export

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    with mlflow.start_run():
        info = log_pytorch_model(model, ClassInfo.cityscapes(), ModelConfig(), registered_model_name="bench")
    client.set_registered_model_alias("bench", "production", info.registered_model_version)
    exported = run_export("models:/bench@production", registered_model="bench-onnx", sizes=((128, 256),))
    if exported["aliases"].get("production") != str(exported["registered_version"]):
        raise RuntimeError(f"the export of the production version did not get alias 'production': {exported}")
    return "bench"


def served(
    name: str, tracking_uri: str, body: bytes, requests: int, workdir: Path, forward: Callable[[], object]
) -> dict:
    """p50/p95 and requests/s of ``mlflow models serve``, with ``forward`` (the in-process forward the server runs)
    timed between requests: on a shared machine only measurements taken under the same load can be compared."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            f"models:/{name}@production",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        cwd=workdir,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/ping", proc, log)
        _post(url, body)  # warm-up: first request pays lazy initialisation
        latencies, forwards, serving_s = [], [], 0.0
        for _ in range(requests):
            t0 = time.perf_counter()
            _post(url, body)
            t1 = time.perf_counter()
            forward()
            forwards.append((time.perf_counter() - t1) * 1000)
            latencies.append((t1 - t0) * 1000)
            serving_s += t1 - t0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
    return {
        "p50_ms": statistics.median(latencies),
        "p95_ms": p95,
        "requests_per_s": requests / serving_s,
        "runs": requests,
        "in_process_forward_p50_ms": statistics.median(forwards),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-2000:]}")


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="", help="benchmark this model instead of a random FC-HarDNet")
    parser.add_argument("--requests", type=int, default=20, help="HTTP requests per served backend")
    parser.add_argument("--repeats", type=int, default=5, help="timed in-process runs at 512x1024")
    args = parser.parse_args(argv)

    from segmentation.inference.predictor import Predictor
    from segmentation.mlops.model_store import load_model
    from segmentation.mlops.serving_requests import encode_image
    from segmentation.models import FCHarDNet
    from segmentation.models.preprocessing import to_input_tensor

    torch.manual_seed(0)
    model = load_model(args.model_uri)[0] if args.model_uri else FCHarDNet(num_classes=19).eval()
    print(describe_machine(), flush=True)
    # 1024x2048 takes seconds per forward on small CPUs: two timed runs after one warm-up.
    load_at_start = os.getloadavg()
    rows = in_process(model, [(512, 1024, args.repeats), (1024, 2048, 2)])
    image = encode_image(street_image(512, 1024))
    rows.append(in_process_request(model, {"image": [image]}, args.repeats))
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}).encode()
    # What the served PyTorch model runs per request (Predictor "auto"), timed between the HTTP requests.
    predictor, x = Predictor(model), to_input_tensor(street_image(512, 1024))
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        name = register(model, tracking_uri)
        for backend, model_name in (("PyTorch model (Predictor auto)", name), ("ONNX model", f"{name}-onnx")):
            result = served(model_name, tracking_uri, body, args.requests, Path(tmp), lambda: predictor.logits(x))
            rows.append(
                {
                    "what": f"served {backend}",
                    "size": "512x1024",
                    **result,
                    "median_ms": result["p50_ms"],
                    "request_kb": round(len(body) / 1024),
                }
            )
            print(
                f"  served {backend}: p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms; in-process "
                f"forward ({predictor.backend}) between requests: {result['in_process_forward_p50_ms']:.0f} ms",
                flush=True,
            )
    print(
        markdown_table(
            rows,
            [
                "what",
                "size",
                "median_ms",
                "min_ms",
                "max_ms",
                "cpu_share",
                "p95_ms",
                "requests_per_s",
                "in_process_forward_p50_ms",
                "runs",
            ],
        )
    )
    # Target: served p50 <= 1.25 x the in-process forward of the path serving uses, measured under the same load.
    served_row = next(r for r in rows if r["what"].startswith("served PyTorch"))
    ratio = served_row["p50_ms"] / served_row["in_process_forward_p50_ms"]
    print(
        f"served PyTorch p50 / in-process forward p50 at 512x1024 (interleaved): {served_row['p50_ms']:.0f} / "
        f"{served_row['in_process_forward_p50_ms']:.0f} ms = {ratio:.2f} (target <= 1.25)"
    )
    # The machine may be shared: the load average says how much of it this run had (cpu_share says it per row).
    extra = {
        "served_over_in_process": ratio,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    print(f"results: {write_results('serving', rows, extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
