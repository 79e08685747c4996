"""Numeric config values are range-checked when the config loads, not when the run that uses them has started."""

from __future__ import annotations

import re

import pytest

from segmentation import config
from segmentation.config_loading import ConfigError, load_config

# key=value -> the allowed range named in the message. Each value used to load fine and then fail (or silently
# mean something else) mid-run: ``step % 0`` raised ZeroDivisionError at the first step, num_workers=-1 made the
# DataLoader exit without naming the config key, a negative seed failed inside NumPy.
REFUSED = {
    "train.val_every_n_steps=0": ">= 1",
    "train.log_every_n_steps=0": ">= 1",
    "train.log_every_n_steps=-5": ">= 1",
    "system.num_workers=-1": ">= 0",
    "eval.num_worst=-1": ">= 0",
    "train.num_val_images_logged=-2": ">= 0",
    "train.sanity_val_batches=-1": ">= 0",
    "train.max_steps=-1": ">= 0",
    "train.epochs=-3": ">= 0",
    "callbacks.checkpoint.top_k=-1": ">= 0",
    "callbacks.early_stopping.patience=0": ">= 1",
    "loss.min_k=0": ">= 1",
    "loss.threshold=-0.1": ">= 0",
    "loss.threshold=nan": ">= 0",
    "loss.ignore_index=256": "in [0, 255]",
    "model.num_classes=257": "in [1, 256]",  # class ids travel as uint8 masks
    "data.ignore_index=-1": "in [0, 255]",
    "scheduler.warmup_steps=-10": ">= 0",
    "eval.sliding_window=-64": ">= 0",
    "augmentation.val_height=-1": ">= 0",
    "system.seed=-1": "in [0, 4294967295]",
    "system.seed=4294967296": "in [0, 4294967295]",
}


@pytest.mark.parametrize("override", sorted(REFUSED))
def test_out_of_range_value_names_key_value_and_range(override):
    key, value = override.split("=")
    message = f"invalid value for '{key}': {float(value) if 'threshold' in key else int(value)!r}; allowed: "
    with pytest.raises(ConfigError, match="^" + re.escape(message + REFUSED[override]) + "$"):
        load_config(None, [override])


def test_out_of_range_value_in_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  val_every_n_steps: 0\n")
    with pytest.raises(ConfigError, match=r"'train\.val_every_n_steps': 0; allowed: >= 1"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    [
        "train.val_every_n_steps=1",
        "system.num_workers=0",
        "eval.num_worst=0",
        "callbacks.checkpoint.top_k=0",
        "loss.threshold=2.5",
        "train.max_steps=0",
        "system.seed=0",
        "system.seed=4294967295",
        "loss.ignore_index=0",
        "model.num_classes=256",
    ],
)
def test_boundary_values_are_accepted(override):
    key, value = override.split("=")
    section, name = key.rsplit(".", 1)
    node = load_config(None, [override])
    for part in section.split("."):
        node = getattr(node, part)
    assert getattr(node, name) == float(value)


def test_every_range_names_a_real_key_and_defaults_are_inside():
    cfg = load_config(None)  # the schema defaults pass their own checks
    for key in config.RANGES:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert isinstance(node, (int, float)), key
