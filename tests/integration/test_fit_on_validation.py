"""fit()'s ``on_validation`` hook (how a sweep reports to its pruner): called after every validation with the step
and the metrics, and able to stop training there. Untracked trainings on the session's tiny synthetic data."""

from __future__ import annotations

from segmentation.config_loading import CONFIG_DIR, load_config
from segmentation.training.checkpoint import list_checkpoints
from segmentation.training.engine import fit


def tiny_cfg(data, tmp_path):
    """4 steps (2 epochs of 2 batches), a validation at every step, no pictures."""
    overrides = ["train.epochs=2", "train.val_every_n_steps=1", "train.sanity_val_batches=0"]
    overrides += [f"data.root={data}", f"train.output_dir={tmp_path / 'out'}", "train.num_val_images_logged=0"]
    return load_config(CONFIG_DIR / "tiny.yaml", overrides)


def test_the_hook_sees_every_validation_and_can_stop_training(tiny_data, tmp_path):
    seen: list[tuple[int, float]] = []

    def record(step, metrics):
        seen.append((step, metrics["val/mIoU"]))
        return False

    result = fit(tiny_cfg(tiny_data, tmp_path), on_validation=record)
    assert result.global_step == 4 and [s for s, _ in seen] == [1, 2, 3, 4]
    assert seen[-1][1] == result.metrics["val/mIoU"]

    stopped: list[int] = []
    result = fit(
        tiny_cfg(tiny_data, tmp_path / "stop"), on_validation=lambda step, m: stopped.append(step) or step == 2
    )
    assert result.global_step == 2 and stopped == [1, 2]
    assert list_checkpoints(result.best_checkpoint.parent)[-1].name == "step-0000002"  # nothing trained after
