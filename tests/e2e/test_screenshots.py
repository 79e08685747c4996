"""The screenshot machinery works: ``python -m scripts.screenshots --quick`` starts its own server, runs a two-run
sweep (both trainings at once), and writes two PNGs that show a rendered page (not a blank page or a spinner). The
README's own pictures take the full pipeline (``python -m scripts.screenshots``, 25–45 min), too long for the suite.
The server's sqlite store is a copy of the session's migrated template (the migrations are most of its start-up)."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import copy_migrated_sqlite

from scripts.cdp import find_chromium

pytestmark = pytest.mark.e2e


def _check_rendered(path, min_colours: int) -> None:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (700, 1200), f"{path}: unexpected size"
    # A blank or spinner-only page is a near-uniform field; a rendered MLflow page has text, charts and colour.
    assert float(image.std()) > 10.0, f"{path}: nearly uniform (std {image.std():.1f})"
    colours = np.unique(image.reshape(-1, 3) // 16, axis=0)
    assert len(colours) >= min_colours, f"{path}: only {len(colours)} colour bins"
    dark = (image.max(axis=2) < 100).mean()  # text and lines
    assert 0.002 < dark < 0.6, f"{path}: dark-pixel share {dark:.3f} is not that of a page with text"


def test_screenshot_script_writes_rendered_pngs(tmp_path, repo):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the screenshot script needs it")
    out = tmp_path / "images"
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    copy_migrated_sqlite(store)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.screenshots",
            "--quick",
            "--output-dir",
            str(out),
            "--lrs",
            "0.01,0.05",
            "--overrides",
            "train.max_steps=2",
            "--jobs",
            "2",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--window-size",
            "1200,700",
            "--chromium",
            chromium,
            "--timeout",
            "120",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["compare_runs.png", "run_images.png"]
    _check_rendered(out / "compare_runs.png", min_colours=12)
    _check_rendered(out / "run_images.png", min_colours=12)
