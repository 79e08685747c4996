"""The ``main`` step: the whole pipeline (preprocess -> train -> evaluate -> export -> promote) as child runs of
one parent run, each reused when it already FINISHED with the same parameters and code."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from segmentation.config import Config
from segmentation.config_loading import resolve_train_config
from segmentation.mlops.connection import check_tracking_server
from segmentation.mlops.pipeline import registered_version_of, run_step, start_parent_run
from segmentation.mlops.run_setup import config_difference

logger = logging.getLogger(__name__)

PIPELINE_SPLIT_ID = "split01"  # preprocess's and evaluate's default, which the pipeline does not change


@dataclass(frozen=True)
class PipelineParams:
    """Every parameter of the ``main`` entry point; each one reaches the step that uses it.

    ``lr`` and ``overrides`` go to ``train`` (``lr`` empty: the config's own value); ``num_images`` to the synthetic
    ``preprocess``.
    """

    dataset: str = "synthetic"
    raw_dir: str = ""
    data_dir: str = "data/synthetic"
    config: str = "configs/synthetic.yaml"
    lr: str = ""
    registered_model: str = "fchardnet-synthetic"
    num_images: int = 200
    num_processes: int = 1
    overrides: str = ""
    reuse: bool = True


def pipeline_step(params: PipelineParams) -> dict[str, str]:
    """Run (or reuse) every step under the parent run (``mlflow run``'s, or a new one); returns what each made.

    A step is reused only when the step before it was (a step that ran again may have made other data, another
    model); ``train`` also only when the reused run's ``cfg.*`` params equal the config as it resolves now (a config
    file edited outside git, or outside the checkout, changes no parameter and no commit).

    Raises:
        ConnectionError: the tracking server does not answer (checked before anything runs).
        ConfigError, FileNotFoundError: the training config, with ``data_dir``, ``lr`` and ``overrides``, does not
            load (checked before anything runs).
        StepFailedError: a step failed (its exit code is the pipeline's).
    """
    data_dir = str(Path(params.data_dir).resolve())
    cfg = resolve_train_config(params.config, data_dir, params.overrides, lr=params.lr)
    check_tracking_server()
    with start_parent_run():
        return _run_steps(params, data_dir, cfg)


def _run_steps(params: PipelineParams, data_dir: str, cfg: Config) -> dict[str, str]:
    client = MlflowClient()
    steps: dict[str, str] = {}

    preprocess_params = {"dataset": params.dataset, "raw_dir": params.raw_dir, "out_dir": data_dir}
    if params.dataset == "synthetic":
        preprocess_params["num_images"] = params.num_images
    table_there = (Path(data_dir) / "split" / f"{PIPELINE_SPLIT_ID}.parquet").is_file()
    prep, reuse = run_step("preprocess", preprocess_params, params.reuse and table_there)
    steps["preprocess"] = prep.info.run_id

    train_params = {
        "config": params.config,
        "data": data_dir,
        "lr": params.lr,
        "num_processes": params.num_processes,
        "registered_model": params.registered_model,
        "overrides": params.overrides,
    }
    train, reuse = run_step("train", train_params, reuse, differs=lambda run: config_difference(run.data.params, cfg))
    steps["train"] = train.info.run_id
    version = registered_version_of(client, params.registered_model, train.info.run_id)
    model_uri = f"models:/{params.registered_model}/{version}"
    steps["model_uri"] = model_uri

    evaluation, _ = run_step("evaluate", {"model_uri": model_uri, "data": data_dir, "split": "val"}, reuse)
    steps["evaluate"] = evaluation.info.run_id
    mlflow.log_metric("val/mIoU", evaluation.data.metrics.get("eval/mIoU", float("nan")))

    export, _ = run_step(
        "export", {"model_uri": model_uri, "registered_model": f"{params.registered_model}-onnx"}, reuse
    )
    steps["export"] = export.info.run_id
    # The export is linked to its source version (tags source_model_name/version), so promoting that version
    # below also moves `production` on the ONNX model.
    onnx_version = registered_version_of(client, f"{params.registered_model}-onnx", export.info.run_id)
    steps["onnx_model_uri"] = f"models:/{params.registered_model}-onnx/{onnx_version}"

    # Promotion depends on the registry's current state, so it always runs.
    promote, _ = run_step("promote", {"model_name": params.registered_model, "version": version}, reuse=False)
    steps["promote"] = promote.info.run_id
    mlflow.set_tags({f"pipeline.{key}": value for key, value in steps.items()})
    return steps
