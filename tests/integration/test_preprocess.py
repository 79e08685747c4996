"""The preprocess step end to end: byte-identical re-runs, the CLI, and lineage logged to a real MLflow server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from segmentation.data.preprocess import run_preprocess
from segmentation.mlops.lineage import log_preprocess_lineage

REPO = Path(__file__).resolve().parents[2]
CVAT_SAMPLE = REPO / "tests" / "data" / "cvat_sample" / "raw"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("dataset", ["synthetic", "cvat"])
def test_rerun_gives_identical_files(tmp_path, dataset):
    raw = CVAT_SAMPLE if dataset == "cvat" else ""
    out = tmp_path / "out"
    table = run_preprocess(dataset, raw, out, num_images=4, height=48, width=64)
    first = tree_digest(out)
    assert table == out / "split" / "split01.parquet" and "split/classes.csv" in first
    assert run_preprocess(dataset, raw, out, num_images=4, height=48, width=64) == table
    assert tree_digest(out) == first  # same names, same bytes; no staging folders left behind


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrypoints.preprocess", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.e2e
def test_cli_writes_table_and_reports_bad_input(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = run_cli(
        "--dataset",
        "synthetic",
        "--out-dir",
        str(tmp_path / "syn"),
        "--num-images",
        "3",
        "--height",
        "32",
        "--width",
        "48",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "syn" / "split" / "split01.parquet").is_file()
    (tmp_path / "raw" / "cvat").mkdir(parents=True)
    (tmp_path / "raw" / "cvat" / "annotations.xml").write_text("<annotations><meta>")
    bad = run_cli("--dataset", "cvat", "--raw-dir", str(tmp_path / "raw"), "--out-dir", str(tmp_path / "o"), env=env)
    assert bad.returncode != 0 and "annotations.xml: malformed XML at line 1" in bad.stderr
    assert not (tmp_path / "o" / "split").exists()


def test_lineage_logged_to_server(tmp_path, tracking_uri):
    table = run_preprocess("cvat", CVAT_SAMPLE, tmp_path / "out")
    assert log_preprocess_lineage(table) is False  # no run: nothing to log into
    with mlflow.start_run() as run:
        assert log_preprocess_lineage(table, num_overlays=2)
    client = mlflow.MlflowClient(tracking_uri)
    logged = client.get_run(run.info.run_id)
    inputs = logged.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "cvat-split01"
    assert inputs[0].tags[0].value == "preprocess" and len(inputs[0].dataset.digest) == 32
    metrics = logged.data.metrics
    assert metrics["data/num_samples/train"] == 2 and metrics["data/pixels/train/label1"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/stats.json", "data/classes.csv", "data/overlays"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "data/overlays")) == 2


def test_cli_attaches_to_mlflow_run_id(tmp_path, tracking_uri):
    run_id = (
        mlflow.MlflowClient(tracking_uri)
        .create_run(mlflow.MlflowClient(tracking_uri).create_experiment(f"pre-{tmp_path.name}"))
        .info.run_id
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run_id}
    done = run_cli(
        "--dataset",
        "synthetic",
        "--out-dir",
        str(tmp_path / "syn"),
        "--num-images",
        "3",
        "--height",
        "32",
        "--width",
        "48",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    logged = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert logged.inputs.dataset_inputs[0].dataset.name == "synthetic-split01"
    assert logged.data.metrics["data/num_samples/val"] == 1
    assert logged.data.tags["preprocess.unread_params"] == "raw_dir"


def test_the_run_names_the_settings_its_dataset_did_not_read(tmp_path, tracking_uri):
    """A CVAT export has its images: the step's num_images, height and width are on the run but not read."""
    from segmentation.steps.preprocess import preprocess_step

    with mlflow.start_run() as run:
        preprocess_step("cvat", CVAT_SAMPLE, tmp_path / "out", num_images=7)
    tags = mlflow.MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    assert tags["preprocess.unread_params"] == "num_images,height,width"


def test_another_split_id_may_not_break_the_tables_already_in_out_dir(tmp_path):
    out = tmp_path / "out"
    split01 = run_preprocess("synthetic", "", out, split_id="split01", num_images=4, height=32, width=48)
    before = tree_digest(out)
    # Another dataset into the same out_dir replaced images/, interim/ and classes.csv under split01 silently.
    with pytest.raises(
        ValueError,
        match=r"holds split table split01\.parquet \(split_id 'split01'\), which this run would break: its file "
        r"split/classes\.csv would be replaced\..* Write split_id 'split02' to another out_dir, or delete .*split01",
    ):
        run_preprocess("cvat", CVAT_SAMPLE, out, split_id="split02")
    assert tree_digest(out) == before
    # Other images under the same classes: split01's images and masks would change.
    with pytest.raises(
        ValueError, match=r"split01\.parquet .* its file images/synthetic_00000\.png would be replaced"
    ):
        run_preprocess("synthetic", "", out, split_id="split02", num_images=4, height=32, width=48, seed=1)
    with pytest.raises(ValueError, match=r"split01\.parquet .* its file images/synthetic_00003\.png would be removed"):
        run_preprocess("synthetic", "", out, split_id="split02", num_images=3, height=32, width=48)
    assert tree_digest(out) == before
    # The same dataset split another way shares the files: allowed, and split01 keeps every file as it was.
    split02 = run_preprocess(
        "synthetic", "", out, split_id="split02", num_images=4, height=32, width=48, val_fraction=0.5
    )
    assert {k: v for k, v in tree_digest(out).items() if k in before} == before
    assert pd.read_parquet(split02)["split"].tolist().count("val") == 2
    # Re-running a split_id replaces its own table, whatever it held; the other table must still agree.
    run_preprocess("synthetic", "", out, split_id="split02", num_images=4, height=32, width=48, val_fraction=0.25)
    assert split01.is_file() and {k: v for k, v in tree_digest(out).items() if k in before} == before


def test_a_raw_dir_given_with_the_synthetic_dataset_is_refused(tmp_path):
    """The generated dataset reads no folder: a raw_dir would be recorded on the run and not used."""

    with pytest.raises(ValueError, match="is not read by dataset='synthetic'"):
        run_preprocess("synthetic", str(tmp_path / "raw"), tmp_path / "out", num_images=2, height=64, width=64)
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_between_its_renames_leaves_no_table_over_mixed_files(tmp_path, monkeypatch):
    """Publishing swaps images/, then interim/, then the split files: stopped after the first swap (as a kill there
    would), no split01 table may pair the new images with the old masks; the next run makes a complete one."""
    from segmentation.data import publish

    out = tmp_path / "out"
    run_preprocess("synthetic", "", out, num_images=3, height=64, width=64, seed=0)
    real = os.replace

    def killed_at_interim(src, dst):
        if Path(src) == out / "interim":
            raise KeyboardInterrupt("stopped between the renames")
        return real(src, dst)

    monkeypatch.setattr(publish.os, "replace", killed_at_interim)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess("synthetic", "", out, num_images=3, height=64, width=64, seed=1)
    monkeypatch.setattr(publish.os, "replace", real)
    assert not (out / "split" / "split01.parquet").exists()
    table = run_preprocess("synthetic", "", out, num_images=3, height=64, width=64, seed=1)
    rows = pd.read_parquet(table)
    assert len(rows) == 3 and all((out / p).is_file() for p in [*rows["image"], *rows["mask"]])
