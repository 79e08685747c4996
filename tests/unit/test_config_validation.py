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
    "loss.threshold=nan": "a finite number >= 0",
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
        "train.clip_grad_norm=0",  # 0 turns clipping off (training.loop clips only when > 0)
        "augmentation.hflip_prob=0",
        "augmentation.hflip_prob=1",
        "augmentation.color_jitter=0",  # 0 turns the jitter off
        "optimizer.momentum=0",
        "optimizer.weight_decay=0",
        "scheduler.power=0",
        "scheduler.warmup_start_factor=1",
        "callbacks.early_stopping.min_delta=0",
        "train.lr=1e-9",
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
    for key, allowed in config.RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        numbers = node if key in config.list_keys() else [node]
        assert all(isinstance(n, (int, float)) and n in allowed for n in numbers or []), key


# Each of these loaded fine and was found (or not) only once the run had started: the builders' own checks
# (``lr <= 0``, ``power < 0``, ``weights < 0``) are all False for NaN, and a probability of 7 or a negative clipping
# norm or jitter silently meant "always" or "off".
REFUSED_WHEN_LOADED = {
    "train.lr=nan": "'train.lr': nan; allowed: a finite number > 0",
    "train.lr=inf": "'train.lr': inf; allowed: a finite number > 0",
    "train.lr=0": "'train.lr': 0.0; allowed: > 0",
    "optimizer.weight_decay=nan": "'optimizer.weight_decay': nan; allowed: a finite number >= 0",
    "optimizer.momentum=-2": "'optimizer.momentum': -2.0; allowed: in [0, 1)",
    "optimizer.momentum=1": "'optimizer.momentum': 1.0; allowed: in [0, 1)",
    "optimizer.betas=[0.9,1.0]": "'optimizer.betas[1]': 1.0; allowed: in [0, 1)",
    "scheduler.power=nan": "'scheduler.power': nan; allowed: a finite number >= 0",
    "scheduler.warmup_start_factor=0": "'scheduler.warmup_start_factor': 0.0; allowed: in (0, 1]",
    "loss.class_weights=[nan,1,1]": "'loss.class_weights[0]': nan; allowed: a finite number >= 0",
    "loss.class_weights=[1,-1]": "'loss.class_weights[1]': -1.0; allowed: >= 0",
    "train.clip_grad_norm=nan": "'train.clip_grad_norm': nan; allowed: a finite number >= 0",
    "train.clip_grad_norm=-5": "'train.clip_grad_norm': -5.0; allowed: >= 0",
    "augmentation.hflip_prob=7": "'augmentation.hflip_prob': 7.0; allowed: in [0, 1]",
    "augmentation.color_jitter=-3": "'augmentation.color_jitter': -3.0; allowed: >= 0",
    "callbacks.early_stopping.min_delta=-0.1": "'callbacks.early_stopping.min_delta': -0.1; allowed: >= 0",
    "eval.scales=[-1]": "'eval.scales[0]': -1.0; allowed: > 0",
    "eval.scales=[[1]]": "'eval.scales[0]': [1]; allowed: a finite number > 0",
    # keys without a range: the walk over every value still refuses NaN and infinities
    "augmentation.scale_max=inf": "'augmentation.scale_max': inf; allowed: a finite number",
    # lengths
    "eval.scales=[]": "'eval.scales': []; allowed: one or more numbers > 0",
    "optimizer.betas=[0.9]": "'optimizer.betas': [0.9]; allowed: two numbers in [0, 1)",
    "loss.class_weights=[1,2]": (
        "'loss.class_weights': 2 weights; allowed: one per class (model.num_classes=19) or null"
    ),
}


@pytest.mark.parametrize("override", sorted(REFUSED_WHEN_LOADED))
def test_nan_infinite_out_of_range_or_wrong_length_is_refused_when_loaded(override):
    with pytest.raises(ConfigError, match="^" + re.escape("invalid value for " + REFUSED_WHEN_LOADED[override]) + "$"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: .nan\n", "'train.lr': nan; allowed: a finite number > 0"),
        ("augmentation:\n  scale_max: .inf\n", "'augmentation.scale_max': inf; allowed: a finite number"),
    ],
)
def test_nan_or_infinity_in_yaml_is_refused(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape("invalid value for " + message) + "$"):
        load_config(path)


def test_one_weight_per_class_is_accepted():
    cfg = load_config(None, ["loss.name=ce", "model.num_classes=3", "loss.class_weights=[0,1,2.5]"])
    assert cfg.loss.class_weights == [0.0, 1.0, 2.5]


# OmegaConf raises a bare TypeError ("Cannot merge incompatible container types") for a mapping where the schema has
# a list: the entry points reported it as an unexpected failure (exit 1, traceback) instead of bad input (exit 2).
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval.scales={a:1}", "eval.scales"),
        ("optimizer.betas={x: 1}", "optimizer.betas"),
        ("loss.class_weights={a: 1}", "loss.class_weights"),
        ("eval.scales.0=2", "eval.scales"),  # one item of a list cannot be set on its own
    ],
)
def test_mapping_for_a_list_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    message = str(caught.value)
    assert message.startswith(f"override: invalid value for '{key}': a mapping ("), message
    assert f"; allowed: a whole list of numbers, e.g. {key}=[" in message


def test_mapping_for_a_list_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  betas: {x: 0.9}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: invalid value for 'optimizer.betas': a mapping ({{'x': 0.9}}); allowed: a whole list of numbers, "
        "e.g. optimizer.betas=[0.9, 0.999]"
    )


# The values of dotted overrides are parsed as YAML; a YAML error escaped (exit 1), and a list item set after the
# whole list raised a ValueError that named no override.
@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [(["eval.scales=[0.5"], "eval.scales=[0.5"), (["eval.scales=[1]", "eval.scales.x=2"], "eval.scales.x=2")],
)
def test_override_that_does_not_parse_is_named(overrides, culprit):
    with pytest.raises(
        ConfigError, match=rf"^override '{re.escape(culprit)}' does not parse \(.*\); expected key=value"
    ):
        load_config(None, overrides)
