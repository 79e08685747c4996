"""Shared helpers for the benchmark scripts: machine description, robust timing, markdown tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What ran the benchmark: CPU model, cores, threads, library versions."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, min_time_s: float = 0.0) -> dict:
    """Median/min/max wall time in ms of ``fn`` after ``warmup`` calls, plus the CPU share the process got.

    The machine is shared: a run whose CPU time is far below wall time * threads did not get its cores, which the
    ``cpu_share`` column makes visible instead of hiding it in a mean.
    """
    for _ in range(warmup):
        fn()
    times, cpu_shares = [], []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        times.append((t1 - t0) * 1000)
        cpu_shares.append((c1 - c0) / max(t1 - t0, 1e-9) / max(torch.get_num_threads(), 1))
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
        "cpu_share": statistics.median(cpu_shares),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict], extra: dict | None = None) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"results name {name!r}: use letters, digits, '_', '-' and '.' only (a file name, no folder)")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "rows": list(rows), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def describe_machine() -> str:
    m = machine()
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}" + (f", GPU {m['cuda']}" if m.get("cuda") else "")
    )
