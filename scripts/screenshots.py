"""Screenshots of the MLflow UI for the README, in its model-training view.

    python -m scripts.screenshots                                   # the README's runs, then its pictures
    python -m scripts.screenshots --tracking-uri http://127.0.0.1:5000 --no-runs   # runs made earlier
    python -m scripts.screenshots --quick --lrs 0.01,0.05 --overrides "train.max_steps=2" --jobs 2 --output-dir /tmp/s

Without ``--tracking-uri`` it starts its own ``mlflow server`` on 127.0.0.1 at a free port (sqlite and artifacts in
a temporary folder, or ``--backend-store-uri``/``--artifacts-destination``). By default it then makes the README's
runs with the commands the README gives (:mod:`scripts.readme_runs`: the default pipeline, a three-run lr sweep, an
Optuna sweep and an INT8 export; 25–45 min on 2 CPU cores) and photographs them (:mod:`scripts.readme_shots`)
into ``--output-dir`` (default ``docs/images``; with ``--quick`` ``screenshots-quick/``, so that the short check
never replaces the README's pictures).

``--quick`` is the short check of the same machinery: one run per learning rate of ``--config`` (default
``configs/tiny.yaml``, ``--jobs`` at once) on a small synthetic set, then ``compare_runs.png`` and
``run_images.png``. Both drive headless Chromium over the DevTools protocol (``scripts/cdp.py``). Exit code 2:
Chromium is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from scripts.cdp import Browser, find_chromium
from scripts.readme_runs import make_runs
from scripts.readme_shots import capture_all

REPO = Path(__file__).resolve().parent.parent
# Set before the app loads so the assistant side panel does not cover a third of every screenshot.
HIDE_ASSISTANT = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)
CLOSE_ASSISTANT = (
    "(() => { const b = document.querySelector("
    "'[data-component-id=\"mlflow.assistant.chat_panel.close\"]'); if (b) b.click(); return !!b; })()"
)
NO_SPINNER = "!document.querySelector('[role=progressbar], .du-bois-light-spin, [data-testid*=spinner]')"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", default="", help="where the PNGs go (default: docs/images; with --quick, screenshots-quick/)"
    )
    parser.add_argument("--tracking-uri", default="", help="use this running server instead of starting one")
    parser.add_argument("--backend-store-uri", default="", help="store of the server started here (default: sqlite)")
    parser.add_argument("--artifacts-destination", default="", help="artifact root of the server started here")
    parser.add_argument("--no-runs", action="store_true", help="photograph the README's runs made earlier")
    parser.add_argument("--quick", action="store_true", help="a short lr sweep and two pictures (the options below)")
    parser.add_argument("--experiment", default="lr-sweep", help="experiment of the sweep")
    parser.add_argument("--lrs", default="0.005,0.02,0.08", help="comma-separated learning rates, one run each")
    parser.add_argument("--no-sweep", action="store_true", help="screenshot the experiment's existing runs")
    parser.add_argument("--config", default="configs/tiny.yaml", help="training config of the sweep")
    parser.add_argument("--data", default="", help="preprocessed data; default: generate a synthetic set")
    parser.add_argument("--overrides", default="", help="dotted overrides for every sweep run")
    parser.add_argument("--jobs", type=int, default=1, help="sweep trainings run at once (tiny configs: all)")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or PATH)")
    parser.add_argument("--window-size", default="1600,1200", help="viewport WIDTH,HEIGHT in CSS pixels")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each page to render")
    return parser


def _http_json(uri: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{uri}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_healthy(uri: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``uri/health`` until it answers 200.

    Raises:
        RuntimeError: the server process exited first (with its log's tail).
        TimeoutError: no answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{uri}/health did not answer within {timeout:.0f} s")


@contextmanager
def mlflow_server(workdir: Path, backend_uri: str = "", artifacts: str = ""):
    """Start ``mlflow server`` on 127.0.0.1 at a free port; yields its URI and stops it (by PID) on exit."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = workdir / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts or str(workdir / "mlartifacts"),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, timeout=180, proc=proc, log=log)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # its own session: the server and the workers it spawned
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of ``experiment``, created when missing (before trainings that start at once could race to)."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        return _http_json(uri, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    return _http_json(uri, "/api/2.0/mlflow/experiments/create", {"name": experiment})["experiment_id"]


def run_sweep(
    uri: str, lrs: list[float], config: str, data: str, experiment: str, overrides: str, workdir: Path, jobs: int = 1
) -> None:
    """Train one run per learning rate with ``entrypoints.train`` (no model registration), ``jobs`` at a time.

    Raises:
        RuntimeError: a training failed; the message holds the tail of its output.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)  # a caller's active run must not swallow the sweep
    if jobs > 1:  # share the cores: N trainings with all threads each run several times slower than one by one
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    ensure_experiment(uri, experiment)
    pending, running = list(lrs), []
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            lr = pending.pop(0)
            log = workdir / f"train-lr{lr}.log"
            cmd = [
                sys.executable,
                "-m",
                "entrypoints.train",
                "--config",
                str(REPO / config),
                "--data",
                data,
                "--lr",
                str(lr),
                "--registered-model",
                "",
                "--experiment",
                experiment,
                "--overrides",
                f"train.output_dir={workdir / 'outputs'} {overrides}".strip(),
            ]
            with log.open("w") as out:
                running.append(
                    (lr, log, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
                )
        lr, log, proc = running.pop(0)
        if proc.wait() != 0:
            for *_, other in running:
                other.kill()
                other.wait()
            raise RuntimeError(f"training with lr={lr} failed ({proc.returncode}):\n{log.read_text()[-5000:]}")


def find_runs(uri: str, experiment: str) -> tuple[str, list[dict]]:
    """The experiment id and its FINISHED runs, newest first.

    Raises:
        ValueError: the experiment does not exist or holds no finished run.
    """
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        experiment_id = _http_json(uri, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"][
            "experiment_id"
        ]
    except urllib.error.HTTPError as exc:
        raise ValueError(f"{uri}: experiment {experiment!r} not found ({exc}); run a sweep first") from None
    runs = _http_json(
        uri,
        "/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [experiment_id],
            "filter": "attributes.status = 'FINISHED'",
            "max_results": 20,
            "order_by": ["attributes.start_time DESC"],
        },
    ).get("runs", [])
    if not runs:
        raise ValueError(f"{uri}: experiment {experiment!r} has no FINISHED run to show")
    return experiment_id, runs


def prediction_image(uri: str, run_id: str, key: str = "val/prediction") -> str:
    """Artifact path of the last-step PNG that ``mlflow.log_image(key=key, step=...)`` stored for ``run_id``.

    Raises:
        ValueError: the run logged no such image.
    """
    query = urllib.parse.urlencode({"run_id": run_id, "path": "images"})
    files = _http_json(uri, f"/api/2.0/mlflow/artifacts/list?{query}").get("files", [])
    # log_image names files "<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>.png" (plus a webp thumbnail).
    prefix = f"images/{key.replace('/', '~')}+step+"
    found = [
        (int(f["path"][len(prefix) :].split("+")[0]), f["path"])
        for f in files
        if f["path"].startswith(prefix) and f["path"].endswith(".png")
    ]
    if not found:
        raise ValueError(f"{uri}: run {run_id} logged no {key!r} image (looked for {prefix}<step>+...png)")
    return max(found)[1]


def _best(runs: list[dict], metric: str = "val/mIoU") -> dict:
    return max(
        runs,
        key=lambda r: next((m["value"] for m in r["data"].get("metrics", []) if m["key"] == metric), float("-inf")),
    )


def swept_param(runs: list[dict]) -> str | None:
    """The parameter whose value differs between ``runs`` (a learning-rate key preferred), or None."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for param in run["data"].get("params", []):
            values.setdefault(param["key"], set()).add(param["value"])
    varied = sorted(k for k, v in values.items() if len(v) > 1 and "dir" not in k and "root" not in k)
    return next((k for k in varied if k.split(".")[-1] == "lr"), varied[0] if varied else None)


def _choose(browser: Browser, index: int, text: str) -> None:
    """Type ``text`` into the ``index``-th select box of the page and press Enter (real input events)."""
    browser.evaluate(f"document.querySelectorAll('input[role=combobox]')[{index}].focus()")
    browser.send("Input.insertText", {"text": text})
    time.sleep(0.5)
    for kind in ("keyDown", "keyUp"):
        browser.send(
            "Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        )


def focus_compare_view(browser: Browser, param: str | None, metric: str = "val/mIoU") -> None:
    """Show only differing parameters and plot ``param`` against ``metric`` (the UI otherwise picks any metric)."""
    browser.evaluate("(() => { const s = document.querySelector('[role=switch]'); if (s) s.click(); })()")
    if param is None:
        return
    cleared = browser.evaluate(
        "(() => { const b = [...document.querySelectorAll('button')].find(x => "
        "x.innerText.trim() === 'Clear All'); if (b) b.click(); return !!b; })()"
    )
    if cleared and browser.evaluate("document.querySelectorAll('input[role=combobox]').length") >= 2:
        _choose(browser, 0, param)
        _choose(browser, 1, metric)
        browser.evaluate("document.activeElement && document.activeElement.blur()")


def capture(
    uri: str,
    experiment_id: str,
    runs: list[dict],
    output_dir: Path,
    chromium: str,
    size: tuple[int, int],
    timeout: float,
) -> list[Path]:
    """Screenshot the compare view of ``runs`` and the last prediction image of the best one (by val/mIoU)."""
    run_ids = [r["info"]["run_id"] for r in runs]
    names = [r["info"].get("run_name") or r["info"]["run_id"] for r in runs]
    compare = (
        f"{uri}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
    )
    best = _best(runs)["info"]["run_id"]
    image = prediction_image(uri, best)
    # The UI matches the file name literally: keep log_image's "+" and "~" unescaped.
    path = urllib.parse.quote(image, safe="/~+")
    artifact = f"{uri}/#/experiments/{experiment_id}/runs/{best}/artifactPath/{path}"
    with Browser(chromium, *size, timeout=timeout) as browser:
        browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": HIDE_ASSISTANT})
        browser.goto(compare)
        shown = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in names)
        browser.wait_for(
            f"document.body && {shown} && document.body.innerText.includes('val/mIoU') && {NO_SPINNER}",
            timeout,
            f"the compare view of runs {names}",
        )
        browser.evaluate(CLOSE_ASSISTANT)
        focus_compare_view(browser, swept_param(runs))
        time.sleep(2.0)  # charts animate in after the data arrives
        first = browser.screenshot(output_dir / "compare_runs.png")

        browser.goto(artifact)
        # The preview is an <img> of the PNG (a panel of three images): wait until it has decoded.
        browser.wait_for(
            "document.body && [...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth >= 3 * 64)",
            timeout,
            f"the artifact preview of {image}",
        )
        browser.evaluate(CLOSE_ASSISTANT)
        time.sleep(1.0)
        second = browser.screenshot(output_dir / "run_images.png")
    return [first, second]


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("Chromium not found: install it (Debian: apt-get install chromium) or pass --chromium", file=sys.stderr)
        return 2
    size = tuple(int(v) for v in args.window_size.split(","))
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        workdir = Path(tmp)
        with (
            mlflow_server(workdir, args.backend_store_uri, args.artifacts_destination)
            if not args.tracking_uri
            else _existing(args.tracking_uri)
        ) as uri:
            if not args.quick:
                if not args.no_runs:
                    times = make_runs(uri, workdir / "runs")
                    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
                with Browser(chromium, *size, timeout=args.timeout) as browser:
                    paths = capture_all(browser, uri, Path(args.output_dir or REPO / "docs" / "images"), args.timeout)
            else:
                if not args.no_sweep:
                    data = args.data or _synthetic_data(workdir / "data")
                    lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
                    run_sweep(uri, lrs, args.config, data, args.experiment, args.overrides, workdir, args.jobs)
                experiment_id, runs = find_runs(uri, args.experiment)
                out = Path(args.output_dir or "screenshots-quick")
                paths = capture(uri, experiment_id, runs, out, chromium, size, args.timeout)
    for path in paths:
        print(f"wrote {path}")
    return 0


@contextmanager
def _existing(uri: str):
    wait_healthy(uri.rstrip("/"), timeout=10)
    yield uri.rstrip("/")


def _synthetic_data(out_dir: Path) -> str:
    from segmentation.data.preprocess import run_preprocess

    run_preprocess("synthetic", "", out_dir, num_images=6, height=128, width=256)  # 5 train, 1 val
    return str(out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
