"""The MLproject ``train`` entry point parses, maps onto entrypoints/train.py's flags and agrees with the config."""

from __future__ import annotations

import shlex

import pytest
from mlflow.projects import _project_spec

from entrypoints.train import get_args_parser, resolve_config
from segmentation.config import load_config


@pytest.fixture(scope="module")
def train_entry(repo):
    return _project_spec.load_project(str(repo)).get_entry_point("train")


def test_every_param_is_an_argparse_flag(train_entry):
    flags = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    for name in train_entry.parameters:
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"MLproject param {name} has no {flag} in entrypoints/train.py"
        assert f"{flag} {{{name}}}" in train_entry.command, f"the command does not pass {name} as {flag}"


def test_defaults_equal_the_config_and_the_parser(repo, train_entry):
    params = {name: p.default for name, p in train_entry.parameters.items()}
    types = {name: p.type for name, p in train_entry.parameters.items()}
    assert types == {"config": "string", "data": "string", "lr": "float", "epochs": "int", "batch_size": "int",
                     "num_processes": "int", "overrides": "string", "resume": "string", "registered_model": "string"}
    cfg = load_config(repo / params["config"])
    assert (params["lr"], params["epochs"], params["batch_size"]) == (cfg.train.lr, cfg.train.epochs,
                                                                      cfg.train.batch_size)
    parser_defaults = vars(get_args_parser().parse_args([]))
    for name in ("config", "num_processes", "overrides", "resume", "registered_model", "data"):
        assert params[name] == parser_defaults[name], name


def test_default_command_resolves_to_the_default_config(repo, train_entry, monkeypatch):
    monkeypatch.chdir(repo)
    command = train_entry.compute_command({}, storage_dir=str(repo))
    args = get_args_parser().parse_args(shlex.split(command)[3:])
    assert resolve_config(args) == load_config(repo / "configs/hardnet_cityscapes.yaml")


def test_explicit_flags_override_and_defaults_keep_the_chosen_config(repo, monkeypatch):
    monkeypatch.chdir(repo)
    parse = get_args_parser().parse_args
    tiny = load_config(repo / "configs/tiny.yaml")
    # What `mlflow run -P config=configs/tiny.yaml` passes: the MLproject defaults, which must not undo tiny's.
    same = resolve_config(parse(["--config", "configs/tiny.yaml", "--lr", "0.02", "--epochs", "484",
                                 "--batch-size", "16", "--data", ""]))
    assert same == tiny
    changed = resolve_config(parse(["--config", "configs/tiny.yaml", "--lr", "0.05", "--epochs", "3",
                                    "--data", "/d", "--overrides", "train.max_steps=7 loss.min_k=64"]))
    assert (changed.train.lr, changed.train.epochs, changed.data.root) == (0.05, 3, "/d")
    assert (changed.train.max_steps, changed.loss.min_k, changed.train.batch_size) == (7, 64, tiny.train.batch_size)
