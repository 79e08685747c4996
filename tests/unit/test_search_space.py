"""Search-space YAML: what loads, what is refused (with the file, the entry and what is allowed), and the overrides
a trial's values become."""

from __future__ import annotations

import pytest

from segmentation.config_loading import CONFIG_DIR, ConfigError, load_config
from segmentation.training.search_space import (
    Distribution,
    check_against_config,
    load_search_space,
    trial_overrides,
)

SWEEPS = CONFIG_DIR / "sweeps"


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_a_space_loads_with_yaml_1_2_numbers(tmp_path):
    space = load_search_space(
        write(
            tmp_path,
            "params:\n"
            "  train.lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n"
            "  loss.min_k: {type: int, low: 128, high: 1024, step: 128}\n"
            "  optimizer.name: {type: categorical, choices: [sgd, adamw]}\n"
            "overrides: [train.max_steps=20]\n"
            "pruner: {n_startup_trials: 1, n_warmup_steps: 5}\n",
        )
    )
    assert space.params == (
        Distribution("train.lr", "float", 1e-4, 0.1, log=True),
        Distribution("loss.min_k", "int", 128, 1024, step=128),
        Distribution("optimizer.name", "categorical", choices=("sgd", "adamw")),
    )
    assert space.overrides == ("train.max_steps=20",)
    assert (space.pruner.n_startup_trials, space.pruner.n_warmup_steps) == (1, 5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params:\n  train.lrr: {type: float, low: 0.1, high: 1}\n", "unknown config key 'train.lrr'. Valid keys: "),
        ("params:\n  train.lr: {type: loguniform, low: 0.1, high: 1}\n", "unknown distribution type 'loguniform'"),
        ("params:\n  train.lr: {type: float, low: 1, high: 0.1}\n", "low (1) must be smaller than high (0.1)"),
        ("params:\n  train.lr: {type: float, low: 0, high: 1, log: true}\n", "log: true needs low > 0"),
        ("params:\n  train.lr: {type: float, low: a, high: 1}\n", "'low' must be a number, got 'a'"),
        ("params:\n  loss.min_k: {type: int, low: 1.5, high: 4}\n", "'low' must be an integer, got 1.5"),
        ("params:\n  train.lr: {type: float, low: 0.1}\n", "'high' is missing"),
        ("params:\n  train.lr: {type: float, lo: 0.1, high: 1}\n", "unknown field(s) ['lo'] for type float"),
        ("params:\n  train.lr: {type: float, low: 0.1, high: 1, log: true, step: 0.1}\n", "cannot be combined"),
        ("params:\n  optimizer.name: {type: categorical, choices: []}\n", "'choices' must be a non-empty list"),
        ("params:\n  train.lr: 0.1\n", "expected a mapping with 'type'"),
        ("params: {}\n", "'params' must map at least one"),
        ("params:\n  train.lr: {type: float, low: 0.1, high: 1}\nsampler: tpe\n", "unknown section(s) ['sampler']"),
        ("params:\n  train.lr: {type: float, low: 0.1, high: 1}\npruner: {patience: 2}\n", "['patience']"),
        ("params: [\n", "not valid YAML"),
    ],
)
def test_bad_spaces_name_the_file_the_entry_and_what_is_allowed(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_search_space(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_missing_space_lists_the_shipped_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthetic.yaml"):
        load_search_space(tmp_path / "nope.yaml")


def test_values_the_config_refuses_fail_before_any_trial(tmp_path):
    space = load_search_space(write(tmp_path, "params:\n  loss.min_k: {type: int, low: 0, high: 64}\n"))
    with pytest.raises(ConfigError, match=r"params.loss.min_k: value 0 is refused: .*loss.min_k.*>= 1"):
        check_against_config(space, CONFIG_DIR / "tiny.yaml")
    space = load_search_space(write(tmp_path, "params:\n  optimizer.betas: {type: float, low: 0.5, high: 0.9}\n"))
    with pytest.raises(ConfigError, match="params.optimizer.betas: value 0.5 is refused"):
        check_against_config(space, CONFIG_DIR / "tiny.yaml")


def test_a_key_both_searched_and_fixed_is_refused(tmp_path):
    space = load_search_space(write(tmp_path, "params:\n  train.lr: {type: float, low: 0.01, high: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"\['train.lr'\] searched and also fixed"):
        check_against_config(space, CONFIG_DIR / "tiny.yaml", ["train.lr=0.05"])


@pytest.mark.parametrize(
    ("space", "config"), [("synthetic", "synthetic"), ("hardnet_cityscapes", "hardnet_cityscapes")]
)
def test_shipped_spaces_fit_their_recipes(space, config):
    loaded = load_search_space(SWEEPS / f"{space}.yaml")
    assert {"train.lr", "optimizer.weight_decay", "loss.min_k", "augmentation.scale_min"} <= set(loaded.keys)
    check_against_config(loaded, CONFIG_DIR / f"{config}.yaml")


def test_trial_values_become_overrides_the_config_reads_back():
    values = {"train.lr": 1e-9, "loss.min_k": 300, "optimizer.name": "adamw", "optimizer.nesterov": True}
    overrides = trial_overrides(values)
    assert overrides == ["train.lr=1e-09", "loss.min_k=300", "optimizer.name=adamw", "optimizer.nesterov=true"]
    cfg = load_config(CONFIG_DIR / "tiny.yaml", overrides)
    assert (cfg.train.lr, cfg.loss.min_k, cfg.optimizer.name, cfg.optimizer.nesterov) == (1e-9, 300, "adamw", True)
