"""The pipeline (`main`) reuses a FINISHED step only when every parameter and the code are the same, and refuses a
bad config before any step runs."""

from __future__ import annotations

import subprocess

import mlflow
import pytest
from conftest import MLFLOW, REPO, child_env, sqlite_tracking_store
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PROJECT_ENTRY_POINT

from entrypoints import main as main_cli
from segmentation.mlops.pipeline import code_version, find_finished_run, logged_parameters

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# What `mlflow run -e evaluate` logs for the parameters `main` passes: every MLproject parameter, defaults included.
MAIN_EVALUATE = {"model_uri": "models:/m/1", "data": "/d", "split": "val"}
EVALUATE_DEFAULTS = {
    "split_id": "split01",
    "batch_size": "1",
    "tta": "none",
    "sliding_window": "0",
    "num_worst": "4",
    "device": "auto",
    "backend": "auto",
    "promote": "false",
    "force": "false",
}


def finished_run(client: MlflowClient, experiment_id: str, entry_point: str, params: dict[str, str]) -> str:
    run = client.create_run(experiment_id, tags={MLFLOW_PROJECT_ENTRY_POINT: entry_point, MLFLOW_GIT_COMMIT: COMMIT})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_run_with_other_values_of_parameters_main_does_not_pass_is_not_reused(tmp_path):
    with sqlite_tracking_store(tmp_path):
        client = MlflowClient()
        experiment_id = client.create_experiment("reuse", artifact_location=str(tmp_path / "art"))
        logged = logged_parameters("evaluate", MAIN_EVALUATE)
        assert {key: logged[key] for key in EVALUATE_DEFAULTS} == EVALUATE_DEFAULTS  # the MLproject defaults
        # Evaluations of the same model made by hand with flip TTA and another split: not what main asks for.
        finished_run(client, experiment_id, "evaluate", {**MAIN_EVALUATE, **EVALUATE_DEFAULTS, "tta": "flip"})
        finished_run(client, experiment_id, "evaluate", {**MAIN_EVALUATE, **EVALUATE_DEFAULTS, "split_id": "s2"})
        assert find_finished_run(client, experiment_id, "evaluate", MAIN_EVALUATE, COMMIT) is None
        same = finished_run(client, experiment_id, "evaluate", {**MAIN_EVALUATE, **EVALUATE_DEFAULTS})
        found = find_finished_run(client, experiment_id, "evaluate", MAIN_EVALUATE, COMMIT)
        assert found is not None and found.info.run_id == same
        assert find_finished_run(client, experiment_id, "evaluate", MAIN_EVALUATE, "f" * 40) is None  # other code


def test_a_value_mlflow_logs_shell_quoted_is_found(tmp_path):
    """`mlflow run` logs ``out dir`` as ``'out dir'``: the step it made is found with the value main passes."""
    out_dir = tmp_path / "data with space"
    (tmp_path / "store").mkdir()
    with sqlite_tracking_store(tmp_path / "store") as uri:
        # Its artifacts in tmp_path (an experiment mlflow run creates would keep them in ./mlruns of the checkout).
        MlflowClient().create_experiment("q", artifact_location=str(tmp_path / "artifacts"))
        params = {"dataset": "synthetic", "out_dir": str(out_dir), "num_images": "3"}
        cmd = [MLFLOW, "run", str(REPO), "-e", "preprocess", "--env-manager", "local", "--experiment-name", "q"]
        cmd += [
            arg for key, value in {**params, "height": "64", "width": "64"}.items() for arg in ("-P", f"{key}={value}")
        ]
        proc = subprocess.run(cmd, env=child_env(uri), capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient()
        experiment_id = client.get_experiment_by_name("q").experiment_id
        (run,) = client.search_runs([experiment_id])
        assert run.data.params["out_dir"] == f"'{out_dir}'"
        commit = run.data.tags.get(MLFLOW_GIT_COMMIT)
        assert commit, "the project is a git checkout: mlflow run tags the commit"
        wanted = {**params, "height": "64", "width": "64"}
        found = find_finished_run(client, experiment_id, "preprocess", wanted, commit)
        assert found is not None and found.info.run_id == run.info.run_id
        assert find_finished_run(client, experiment_id, "preprocess", {**wanted, "seed": "7"}, commit) is None


def test_a_value_with_both_quote_characters_is_compared_without_the_search(tmp_path):
    """``a'b "c"`` cannot be written in an MLflow filter; the run is still found (compared in Python)."""
    with sqlite_tracking_store(tmp_path):
        client = MlflowClient()
        experiment_id = client.create_experiment("quotes", artifact_location=str(tmp_path / "art"))
        given = {**MAIN_EVALUATE, "data": '/d/o\'brien "x"'}
        logged = logged_parameters("evaluate", given)
        assert logged["data"] == "'/d/o'\"'\"'brien \"x\"'"  # shlex's quoting, as mlflow run logs it
        made = finished_run(client, experiment_id, "evaluate", logged)
        found = find_finished_run(client, experiment_id, "evaluate", given, COMMIT)
        assert found is not None and found.info.run_id == made


def test_code_version_needs_the_project_tracked_and_clean(tmp_path):
    outer = tmp_path / "repo"
    project = outer / "project"
    project.mkdir(parents=True)
    assert code_version(project)[0] is None and "not in a git checkout" in code_version(project)[1]
    git = ["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (outer / "other.txt").write_text("another project's file\n")
    (project / "MLproject").write_text("name: x\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "other.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    # A project copied into another checkout without being added: its commit says nothing about its code.
    commit, why_not = code_version(project)
    assert len(commit) == 40 and "does not track the project's files" in why_not
    subprocess.run([*git, "add", "project/MLproject"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "two"], check=True)
    commit, why_not = code_version(project)
    assert why_not == ""
    (project / "notes.txt").write_text("untracked files do not change the code")
    (outer / "other.txt").write_text("an edit outside the project folder does not either\n")
    assert code_version(project) == (commit, "")
    (project / "MLproject").write_text("name: y\n")
    assert code_version(project) == (commit, "the working tree has uncommitted changes to tracked files")


def test_main_refuses_a_bad_config_before_any_step_runs(tmp_path, monkeypatch, capsys):
    with sqlite_tracking_store(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        argv = ["--data-dir", str(tmp_path / "d"), "--config", "configs/tiny.yaml", "--lr", "0.1"]
        code = main_cli.main([*argv, "--overrides", "train.lr=0.2"])
        assert code == 2 and "lr=0.1 and overrides train.lr=..." in capsys.readouterr().err
        assert main_cli.main([*argv[:2], "--config", "configs/no_such.yaml"]) == 2
        assert not (tmp_path / "d").exists()
        assert mlflow.search_runs(search_all_experiments=True).empty  # nothing started


@pytest.mark.parametrize(
    ("recipe", "overrides", "named"),
    [
        ({"lr": "0.05"}, "train.lr=0.1", "lr=0.05 and overrides train.lr=..."),
        ({"epochs": "3"}, "train.max_steps=5 train.epochs=2", "epochs=3 and overrides train.epochs=..."),
    ],
)
def test_a_setting_given_as_a_parameter_and_as_an_override_is_refused(recipe, overrides, named):
    from segmentation.config_loading import ConfigError, resolve_train_config

    with pytest.raises(ConfigError, match="given twice") as caught:
        resolve_train_config("configs/tiny.yaml", "", overrides, **recipe)
    assert named in str(caught.value)
    with pytest.raises(ConfigError, match=r"data=/x and overrides data.root=\.\.\."):
        resolve_train_config("configs/tiny.yaml", "/x", "data.root=/y")
    cfg = resolve_train_config("configs/tiny.yaml", "/x", "train.max_steps=5", lr="0.05")
    assert (cfg.train.lr, cfg.data.root, cfg.train.max_steps) == (0.05, "/x", 5)
