"""Every shipped config builds model, loss, optimizer and scheduler; bad keys and types are explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segmentation.config_loading import ConfigError, load_config
from segmentation.models import build_model
from segmentation.training.losses import build_loss
from segmentation.training.optim import build_optimizer, build_scheduler

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"hardnet_cityscapes.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds_and_trains_one_step(path):
    cfg = load_config(path)
    model = build_model(cfg.model)
    loss_fn = build_loss(cfg.loss, num_classes=cfg.model.num_classes)
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.train.lr)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps=cfg.train.max_steps or 1000)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.randint(0, cfg.model.num_classes, (2, 64, 64))
    mask[:, :4] = cfg.loss.ignore_index
    loss = loss_fn(model(image), mask)
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert torch.isfinite(loss)
    assert optimizer.param_groups[0]["lr"] < cfg.train.lr  # poly decays from the first step on


def test_published_recipe_values():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "hardnet_cityscapes.yaml")
    assert (cfg.train.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay, cfg.optimizer.nesterov) == (
        0.02,
        0.9,
        5e-4,
        False,
    )
    assert (cfg.scheduler.name, cfg.scheduler.power, cfg.scheduler.warmup_steps) == ("poly", 0.9, 0)
    assert (cfg.loss.name, cfg.loss.min_k, cfg.loss.threshold) == ("bootstrapped_ce", 4096, 0.3)
    assert (cfg.train.batch_size, cfg.train.max_steps) == (16, 90000)
    assert (cfg.augmentation.crop_height, cfg.augmentation.crop_width) == (1024, 1024)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.depth'.*model\.arch.*model\.num_classes"):
        load_config(None, ["model.depth=70"])


def test_unknown_yaml_key_names_file_and_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  name: sgd\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optimizer\.lr.*optimizer\.momentum"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"), [("train.lr=fast", "train.lr"), ("train.batch_size=1.5", "train.batch_size")]
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("model.arch=unet", "fchardnet70"),
        ("loss.name=focal", "bootstrapped_ce"),
        ("optimizer.name=lamb", "adamw"),
        ("scheduler.name=cosine", "poly"),
    ],
)
def test_invalid_choice_lists_allowed(override, allowed):
    with pytest.raises(ConfigError, match=allowed):
        load_config(None, [override])
