"""Run every benchmark present and gather their tables into ``benchmarks/results/README_tables.md``.

Run: ``python benchmarks/run_all.py`` or ``python -m benchmarks.run_all`` (``--only inference training``,
``--skip serving``). Each benchmark runs as ``python -m benchmarks.<name>`` in its own process, so one's memory
(ONNX Runtime arenas, compiled graphs, servers) does not distort the next; its full output goes to
``results/<name>.log`` and its JSON to ``results/<name>.json`` (``<name>_<isa>.json`` for inference and formats,
whose figures depend on the CPU's vector extensions: ``avx2``, ``avx2_vnni``, ``avx512``, ``avx512_vnni``, ``amx``).
A failing benchmark is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `segmentation` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, describe_machine  # noqa: E402
from segmentation.io import write_text_atomic  # noqa: E402

# Cheap and independent first; Spark and serving last, as they start JVMs and servers.
BENCHMARKS = (
    "ceilings",
    "inference",
    "formats",
    "training",
    "data_loading",
    "tracking",
    "model_logging",
    "batch_predict",
    "serving",
)
TABLES_FILE = RESULTS_DIR / "README_tables.md"


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return [name for name in BENCHMARKS if (here / f"{name}.py").is_file()]


def summary(output: str) -> str:
    """The tables and notes of a benchmark's output, without its indented progress lines."""
    kept: list[str] = []
    for line in output.splitlines():
        if not line or line[0].isspace():
            continue
        if kept and not (line.startswith("|") and kept[-1].startswith("|")):
            kept.append("")  # markdown needs a blank line around tables; table rows stay together
        kept.append(line)
    return "\n".join(kept)


def run_one(name: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS_DIR / f"{name}.log", proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="do not run these")
    args = parser.parse_args(argv)
    names = [n for n in available() if (not args.only or n in args.only) and n not in args.skip]
    sections = [f"# Benchmark tables\n\n{describe_machine()}\n"]
    failed = []
    for name in names:
        print(f"== {name} ...", flush=True)
        code, output, seconds = run_one(name)
        status = "ok" if code == 0 else f"FAILED (exit {code}, see results/{name}.log)"
        print(f"   {status} in {seconds:.0f} s", flush=True)
        if code:
            failed.append(name)
        sections.append(f"## {name} ({status}, {seconds:.0f} s)\n\n{summary(output)}\n")
    write_text_atomic(TABLES_FILE, "\n".join(sections))
    print(f"tables: {TABLES_FILE}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
