"""train_step() on a tiny synthetic dataset (64x128, CPU) tracking to the session's real MLflow server."""

from __future__ import annotations

import math
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from conftest import tracking_store
from mlflow import MlflowClient

from segmentation.config_loading import CONFIG_DIR, load_config
from segmentation.mlops.tracker import Tracker
from segmentation.steps.train import train_step
from segmentation.training.checkpoint import STATE_FILE, TrainerState, list_checkpoints, load_weights

TINY = CONFIG_DIR / "tiny.yaml"


def tiny_cfg(data: Path, tmp_path: Path, *overrides: str):
    """configs/tiny.yaml for 2 epochs = 4 steps (max_steps), validating and checkpointing at steps 2 and 4."""
    return load_config(
        TINY, [f"data.root={data}", f"train.output_dir={tmp_path / 'out'}", "train.epochs=2", *overrides]
    )


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_fit_tracks_everything_and_steps_lr_once_per_step(tiny_data, tmp_path, tracking_uri):
    result = train_step(tiny_cfg(tiny_data, tmp_path), experiment="engine-test", log_model=False)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["cfg.train.lr"] == "0.02" and run.data.params["cfg.model.num_classes"] == "19"
    assert [s for s, _ in history(client, result.run_id, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in history(client, result.run_id, "val/mIoU")] == [2, 4]
    assert "val/IoU/traffic light" in run.data.metrics and "val/pixel_acc" in run.data.metrics
    assert run.data.tags["segmentation.num_processes"] == "1"
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "config", "images"} <= top
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/step-0000002",
        "checkpoints/step-0000004",
    ]  # top_k=2 keeps both
    files = {Path(a.path).name for a in client.list_artifacts(result.run_id, "checkpoints/step-0000004")}
    assert {STATE_FILE, "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= files
    local = tmp_path / "out" / result.run_id / "checkpoints"
    assert [p.name for p in list_checkpoints(local)] == ["step-0000002", "step-0000004"]
    assert not [p for p in local.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left
    state = TrainerState.read(local / "step-0000004" / STATE_FILE)
    assert state.global_step == 4 and state.mlflow_run_id == result.run_id and len(state.history) == 2
    # Step s trains with lr * (1 - (s-1)/total)^0.9; a scheduler stepped twice per step would fall faster.
    logged = history(client, result.run_id, "train/lr")
    expected = [(s, 0.02 * (1 - (s - 1) / 4) ** 0.9) for s in range(1, 5)]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert all(math.isclose(v, e, rel_tol=1e-6) for (_, v), (_, e) in zip(logged, expected, strict=True))


def test_checkpoints_are_logged_models_with_their_scores_and_the_best_is_registered(tiny_data, tmp_path, tracking_uri):
    name = f"engine-models-{uuid.uuid4().hex[:8]}"
    # top_k=0 keeps only the last checkpoint: step 2's model is pruned with its checkpoint.
    cfg = tiny_cfg(tiny_data, tmp_path, "callbacks.checkpoint.top_k=0")
    result = train_step(cfg, experiment="engine-models", registered_model=name)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    validation = inputs[f"{tiny_data.name}/split01/val"]
    assert {t.key: t.value for t in validation.tags}["mlflow.data.context"] == "validation"
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert [m.name for m in models] == ["checkpoint-step-0000004"]  # step 2's was deleted when it was pruned
    (model,) = models
    scores = {m.key: m for m in model.metrics}
    assert scores["val/mIoU"].step == 4 and scores["val/mIoU"].value == pytest.approx(result.metrics["val/mIoU"])
    assert scores["val/mIoU"].dataset_digest == validation.dataset.digest
    assert result.model_version == "1"
    version = client.get_model_version(name, "1")
    assert version.source == f"models:/{model.model_id}" and version.tags["step"] == "4"
    assert (tmp_path / "out" / result.run_id / "models" / "step-0000004" / "model.json").is_file()
    assert not (tmp_path / "out" / result.run_id / "models" / "step-0000002").exists()


@pytest.mark.parametrize("where", ["epoch_boundary_local", "mid_epoch_from_artifacts"])
def test_resume_reproduces_uninterrupted_weights(where, tiny_data, tmp_path, tracking_uri):
    overrides = ["train.val_every_n_steps=2"]
    if where.startswith("mid_epoch"):
        # Batch 1 gives 4 steps per epoch, so step 2 is mid-epoch. Augmentation without randomness isolates what
        # resume itself must restore there (data order, optimizer, scheduler, RNG).
        overrides += [
            "train.batch_size=1",
            "augmentation.hflip_prob=0",
            "augmentation.scale_min=1",
            "augmentation.scale_max=1",
        ]
    cfg = tiny_cfg(tiny_data, tmp_path, *overrides)
    full = train_step(cfg, log_model=False)
    local = tmp_path / "out" / full.run_id / "checkpoints"
    final = load_weights(local / "step-0000004")
    shutil.rmtree(local / "step-0000004")  # as if the process died between step 2 and step 4
    if where.endswith("from_artifacts"):
        shutil.rmtree(local)  # the machine is gone: resume must download the checkpoint from the run
        Tracker(full.run_id).delete_artifacts("checkpoints/step-0000004")
    resumed = train_step(cfg, resume_run_id=full.run_id, log_model=False)
    assert resumed.run_id == full.run_id and resumed.global_step == 4
    again = load_weights(local / "step-0000004")
    for key, value in final.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=f"{key} differs after resume")
    client = MlflowClient()
    assert [s for s, _ in history(client, full.run_id, "train/loss")] == [1, 2, 3, 4]  # none logged twice
    assert client.get_run(full.run_id).info.status == "FINISHED"


def test_unreachable_server_fails_before_training(tiny_data, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        tracking_store(f"http://127.0.0.1:{port}"),
        pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*not reachable"),
    ):
        train_step(tiny_cfg(tiny_data, tmp_path))
    assert not (tmp_path / "out").exists()


def test_bad_inputs_have_clear_errors(tiny_data, tmp_path, tracking_uri):
    with pytest.raises(FileNotFoundError, match="preprocess"):
        train_step(tiny_cfg(tmp_path / "nothing_here", tmp_path))
    with pytest.raises(ValueError, match="num_classes=7.*19 classes"):
        train_step(tiny_cfg(tiny_data, tmp_path, "model.num_classes=7"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train_step(tiny_cfg(tiny_data, tmp_path, "system.mixed_precision=fp16"))
    with pytest.raises(ValueError, match="run id 'f00' does not exist"):
        train_step(tiny_cfg(tiny_data, tmp_path), resume_run_id="f00")
    client = MlflowClient()
    empty = client.create_run(client.create_experiment("no-checkpoints")).info.run_id
    with pytest.raises(ValueError, match=f"cannot resume run {empty}: it is not a training run"):
        train_step(tiny_cfg(tiny_data, tmp_path), resume_run_id=empty)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tiny_data, tmp_path, tracking_uri):
    cfg = tiny_cfg(tiny_data, tmp_path, "train.lr=1e30", "train.val_every_n_steps=1", "loss.name=ce")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step (\d+)") as info:
        train_step(cfg, experiment="nan-test", log_model=False)
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("nan-test").experiment_id])[0]
    assert run.info.status == "FAILED"
    kept = list_checkpoints(tmp_path / "out" / run.info.run_id / "checkpoints")
    failed_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert kept and TrainerState.read(kept[-1] / STATE_FILE).global_step == failed_step - 1
    assert all(torch.isfinite(v).all() for v in load_weights(kept[-1]).values())
