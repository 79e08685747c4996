"""MLproject and the entry points agree: every parameter is a flag of its entry point, passed under its own name."""

from __future__ import annotations

import importlib

import pytest
from mlflow.projects import _project_spec


@pytest.mark.parametrize(
    "name", ["main", "preprocess", "train", "evaluate", "promote", "predict", "export", "register"]
)
def test_every_param_is_a_flag_of_its_entry_point(repo, name):
    entry = _project_spec.load_project(str(repo)).get_entry_point(name)
    module = importlib.import_module(f"entrypoints.{name}")
    flags = {opt for action in module.get_args_parser()._actions for opt in action.option_strings}
    assert f"python -m entrypoints.{name} " in entry.command
    for param in entry.parameters:
        flag = "--" + param.replace("_", "-")
        assert flag in flags, f"MLproject {name}.{param} has no {flag} in entrypoints/{name}.py"
        assert f"{flag} {{{param}}}" in entry.command, f"the {name} command does not pass {param} as {flag}"


def test_recipe_params_default_to_the_configs_own_value(repo):
    train = _project_spec.load_project(str(repo)).get_entry_point("train")
    main = _project_spec.load_project(str(repo)).get_entry_point("main")
    for entry, names in ((train, ("lr", "epochs", "batch_size", "data")), (main, ("lr",))):
        for param in names:
            assert (entry.parameters[param].type, entry.parameters[param].default) == ("string", ""), param
