"""The tracking journal against a real MLflow server: what cannot be delivered is kept aside and counted while the
rest (the final status included) goes through; ``sync_tracking`` says so with exit code 3, and refuses an unusable
journal folder with exit code 2; a full disk does not stop training through its tracking."""

from __future__ import annotations

import json
import resource
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, random_bn_model
from mlflow import MlflowClient

from entrypoints import sync_tracking
from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.mlops.delivery import Delivery
from segmentation.mlops.journal_file import CURSOR_FILE, JOURNAL_FILE, META_FILE, QUARANTINE_FILE
from segmentation.mlops.tracker import Tracker
from segmentation.models.package import save_model_package

EXIT_BAD_INPUT, EXIT_TRACKING_INCOMPLETE = 2, 3
CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))


@pytest.fixture
def client(tracking_uri) -> MlflowClient:
    return MlflowClient(tracking_uri)


def new_run(client: MlflowClient) -> str:
    name = "journal-tests"
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    return client.create_run(experiment, run_name=uuid.uuid4().hex[:8]).info.run_id


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def metrics(step: int) -> dict:
    return {"kind": "metrics", "step": step, "timestamp": 1_700_000_000_000 + step, "values": {"loss": float(step)}}


def quarantine(directory: Path) -> list[dict]:
    return [json.loads(x) for x in (directory / QUARANTINE_FILE).read_text().splitlines()]


def test_records_whose_files_are_gone_are_quarantined_and_the_rest_with_the_end_delivered(
    client, tracking_uri, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = new_run(client)
    folder = tmp_path / "tracking"
    tracker = Tracker(run_id, tracking_uri=f"http://127.0.0.1:{free_port()}")  # a training whose server is down
    tracker.open_journal(folder, system_metrics_interval=0, metrics_interval=0)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "val/prediction", 1)
    for name in ("step-1", "step-2", "step-3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
        tracker.log_artifacts(tmp_path / name, f"checkpoints/{name}", last="state.json")
    shutil.rmtree(tmp_path / "step-1")  # pruned by the training: its upload is undone by the delete that follows
    tracker.delete_artifacts("checkpoints/step-1")
    tracker.log_metrics({"train/loss": 2.0}, 2)
    assert not tracker.end("FINISHED", timeout=1)
    # Before the sync, the image and a checkpoint folder are deleted by hand.
    (image,) = (folder / "images").iterdir()
    image.unlink()
    shutil.rmtree(tmp_path / "step-2")

    code = sync_tracking.main([str(folder), "--tracking-uri", tracking_uri, "--timeout", "60"])
    err = capsys.readouterr().err
    assert code == EXIT_TRACKING_INCOMPLETE, err
    assert "2 record(s)" in err and str(folder / QUARANTINE_FILE) in err and "Traceback" not in err
    assert client.get_run(run_id).info.status == "FINISHED"  # the end went through behind them
    assert steps(client, run_id, "train/loss") == [1, 2]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/step-3"]
    kept = {e["record"]["kind"]: e["error"] for e in quarantine(folder)}
    assert kept.keys() == {"image", "artifacts"}
    assert image.name in kept["image"] and "step-2" in kept["artifacts"]

    # Run again: nothing is sent twice, and the quarantined records are still reported until moved away.
    assert sync_tracking.main([str(folder)]) == EXIT_TRACKING_INCOMPLETE
    assert "2 record(s)" in capsys.readouterr().err and steps(client, run_id, "train/loss") == [1, 2]
    (folder / QUARANTINE_FILE).rename(tmp_path / "handled.jsonl")
    assert sync_tracking.main([str(folder)]) == 0


DAMAGE = {
    "invalid UTF-8": (b'{"kind": "metrics", "values": {"\xff": 1}}\n', "invalid UTF-8"),
    "not an object": (b'"metrics"\n', "not an object"),
    "no kind": (b'{"step": 2}\n', "no 'kind' field"),
    "unknown kind": (b'{"kind": "sound"}\n', "unknown record kind 'sound'"),
    "missing field": (b'{"kind": "metrics", "step": 2, "timestamp": 0}\n', "without its 'values' field"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_sync_quarantines_a_damaged_line_delivers_the_rest_and_exits_3(client, tracking_uri, tmp_path, capsys, damage):
    raw, reason = DAMAGE[damage]
    run_id = new_run(client)
    (tmp_path / META_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    end = {"kind": "end", "status": "FINISHED", "timestamp": 1_700_000_000_009}
    (tmp_path / JOURNAL_FILE).write_bytes(line(metrics(1)) + raw + line(metrics(3)) + line(end))

    code = sync_tracking.main([str(tmp_path), "--timeout", "60"])
    err = capsys.readouterr().err
    assert code == EXIT_TRACKING_INCOMPLETE, err
    assert "1 record(s)" in err and "line 2: " in err and reason in err and "Traceback" not in err
    assert steps(client, run_id, "loss") == [1, 3] and client.get_run(run_id).info.status == "FINISHED"
    assert quarantine(tmp_path)[0]["line"] == 2


BAD_FOLDERS = {
    "run.json not JSON": ({META_FILE: b'{"run_id": '}, "is not valid JSON"),
    "run.json not UTF-8": ({META_FILE: b'{"run_id": "\xff"}'}, "is not UTF-8 text"),
    "run.json not an object": ({META_FILE: b"[]"}, "holds a JSON list"),
    "run.json without run_id": ({META_FILE: b'{"tracking_uri": "http://x"}'}, "has no 'run_id'"),
    "run.json empty run_id": ({META_FILE: b'{"run_id": "", "tracking_uri": "http://x"}'}, "expected a non-empty"),
    "non-numeric cursor": ({CURSOR_FILE: b"twelve"}, "holds 'twelve'"),
}


@pytest.mark.parametrize("bad", BAD_FOLDERS, ids=list(BAD_FOLDERS))
def test_sync_refuses_an_unusable_journal_folder_with_exit_2(client, tracking_uri, tmp_path, capsys, bad):
    files, message = BAD_FOLDERS[bad]
    (tmp_path / META_FILE).write_text(json.dumps({"run_id": new_run(client), "tracking_uri": tracking_uri}))
    (tmp_path / JOURNAL_FILE).write_bytes(line(metrics(1)))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    code = sync_tracking.main([str(tmp_path), "--timeout", "5"])  # refused before any request
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    bad_file = next(iter(files))
    assert str(tmp_path / bad_file) in err and message in err and "Traceback" not in err


def test_a_full_disk_does_not_stop_training_and_end_reports_what_was_not_journaled(client, tracking_uri, tmp_path):
    """Simulates a disk that is full from one moment on: RLIMIT_FSIZE at the journal's size makes every later append
    fail with EFBIG (an OSError, as ENOSPC is) in this process, without root or a special filesystem. The journal is
    made the largest file the process writes meanwhile, so that nothing else reaches the limit."""
    run_id = new_run(client)
    tracker = Tracker(run_id, tracking_uri=tracking_uri)
    tracker.open_journal(tmp_path / "tracking", system_metrics_interval=0, metrics_interval=0)
    tracker.log_metrics({f"pad/{i:03d}": 0.0 for i in range(1000)}, 0)
    tracker.log_metrics({"train/loss": 1.0}, 1)
    assert tracker.journal.drain(60)
    size = (tmp_path / "tracking" / JOURNAL_FILE).stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        for step in (2, 3, 4):  # the training's logging calls: none may raise
            tracker.log_metrics({"train/loss": float(step)}, step)
        tracker.log_artifacts(tmp_path, "checkpoints/step-4")
        delivered = tracker.end("FINISHED", timeout=30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not delivered  # so the train step raises TrackingIncompleteError: exit code 3
    report = tracker.undelivered()
    assert "5 write(s) could not be journaled" in report and "File too large" in report, report
    assert steps(client, run_id, "train/loss") == [1]
    assert client.get_run(run_id).info.status == "RUNNING"  # not even the end could be journaled


def test_a_checkpoint_model_is_logged_to_the_training_run_without_ending_it(client, tmp_path):
    # Logging a model through mlflow.start_run(run_id=...) ends that run on exit: the UI then showed a training
    # that was still going as FINISHED (with an end time) from its first checkpoint on.
    run_id = new_run(client)
    client.log_metric(run_id, "val/mIoU", 0.5, step=3)
    client.log_param(run_id, "cfg.train.lr", "0.02")
    package = save_model_package(random_bn_model(3), CLASSES, ModelConfig(num_classes=3), tmp_path / "package")
    Delivery(client, run_id, journal_dir=None).send(
        [{"kind": "model", "package": str(package), "name": "checkpoint-step-0000003", "step": 3}]
    )
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and not run.info.end_time
    (model,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert model.name == "checkpoint-step-0000003" and model.status.to_proto() == model.status.READY.to_proto()
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 3)]
    assert model.tags["num_classes"] == "3" and model.params == {"cfg.train.lr": "0.02"}  # as for an active run
