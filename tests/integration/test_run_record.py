"""What a resumed training's run records when the resume changed a config value: MLflow never changes a param, so
the new value is a ``resume.cfg.*`` tag and the resume's config an artifact of its own."""

from __future__ import annotations

import mlflow
from conftest import sqlite_tracking_store
from mlflow import MlflowClient

from segmentation.config_loading import load_config
from segmentation.mlops.run_setup import RunSetup


def test_a_resume_that_changes_the_recipe_records_the_values_in_use(tmp_path):
    with sqlite_tracking_store(tmp_path):
        run_id = (
            MlflowClient()
            .create_run(MlflowClient().create_experiment("record", artifact_location=str(tmp_path / "art")))
            .info.run_id
        )
        setup = RunSetup(run_id)
        setup.log_config(load_config("configs/tiny.yaml", ["train.lr=0.02", "train.epochs=1"]))
        setup.log_config(load_config("configs/tiny.yaml", ["train.lr=0.005", "train.epochs=3"]))  # the resume
        run = MlflowClient().get_run(run_id)
        assert (run.data.params["cfg.train.lr"], run.data.params["cfg.train.epochs"]) == ("0.02", "1")
        resumed = {k: v for k, v in run.data.tags.items() if k.startswith("resume.")}
        assert resumed == {"resume.cfg.train.lr": "0.005", "resume.cfg.train.epochs": "3"}
        files = sorted(a.path for a in MlflowClient().list_artifacts(run_id, "config"))
        assert files[1] == "config/resolved.yaml" and files[0].startswith("config/resolved-resume-")
        assert "lr: 0.005" in mlflow.artifacts.load_text(f"runs:/{run_id}/{files[0]}")
        setup.log_config(load_config("configs/tiny.yaml", ["train.lr=0.02", "train.epochs=3"]))  # lr back
        tags = MlflowClient().get_run(run_id).data.tags
        assert (tags["resume.cfg.train.lr"], tags["resume.cfg.train.epochs"]) == ("0.02", "3")
        assert len(MlflowClient().list_artifacts(run_id, "config")) == 3


def test_config_difference_compares_a_runs_params_with_the_config_as_it_resolves_now(tmp_path):
    """The pipeline reuses a training only when its cfg.* params equal today's config: an edit to a config file
    outside git changes no parameter and no commit, only this."""
    from segmentation.mlops.run_setup import config_difference

    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  lr: 0.02\n  max_steps: 3\n")
    with sqlite_tracking_store(tmp_path):
        run_id = (
            MlflowClient()
            .create_run(MlflowClient().create_experiment("diff", artifact_location=str(tmp_path / "art")))
            .info.run_id
        )
        RunSetup(run_id).log_config(load_config(config))
        params = MlflowClient().get_run(run_id).data.params
    assert config_difference(params, load_config(config)) is None
    config.write_text("train:\n  lr: 0.05\n  max_steps: 3\n")
    assert config_difference(params, load_config(config)) == "its cfg.train.lr is '0.02', the config now gives '0.05'"
