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
        run_id = MlflowClient().create_run(mlflow.set_experiment("record").experiment_id).info.run_id
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
