"""A sweep (in-process, one worker, the session's real MLflow server) whose trials fail because of their own values:
recorded as failed trials and failed child runs, counted towards ``n_trials``, and the sweep goes on; and a bad
search space stopping with exit code 2 before any run exists."""

from __future__ import annotations

import uuid

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from entrypoints import sweep as sweep_entry
from segmentation.config_loading import CONFIG_DIR
from segmentation.steps.sweep import SweepParams, sweep_step

TINY_TRIAL = (
    "train.epochs=1 train.max_steps=2 train.val_every_n_steps=1 train.sanity_val_batches=0 "
    "train.num_val_images_logged=0"
)


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tiny_data, tmp_path, tracking_uri):
    space = tmp_path / "space.yaml"
    space.write_text(
        "params:\n"
        "  train.lr: {type: categorical, choices: [0.2, 1e12]}\n"
        "  augmentation.scale_min: {type: float, low: 0.5, high: 1.0}\n"
        "  augmentation.scale_max: {type: float, low: 0.9, high: 1.5}\n"
    )
    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", f"failures-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    ok = {"augmentation.scale_min": 0.75, "augmentation.scale_max": 1.25}
    study.enqueue_trial({"train.lr": 0.2, **ok})
    study.enqueue_trial({"train.lr": 0.2, "augmentation.scale_min": 1.0, "augmentation.scale_max": 0.9})  # refused
    study.enqueue_trial({"train.lr": 1e12, **ok})  # the loss is NaN at step 2
    params = SweepParams(
        space=str(space),
        n_trials=3,
        study=name,
        storage=storage,
        config=str(CONFIG_DIR / "tiny.yaml"),
        data=str(tiny_data),
        overrides=f"{TINY_TRIAL} train.output_dir={tmp_path / 'out'}",
        registered_model=f"{name}-model",
        heartbeat_interval=1,
        grace_period=5,
        experiment=name,
    )
    result = sweep_step(params)
    assert result.trials_run == [0, 1, 2] and result.best_trial == 0 and result.model_version == "1"
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert "scale_min/scale_max must satisfy" in trials[1].user_attrs["failure"]
    assert "non-finite training loss" in trials[2].user_attrs["failure"]
    client = MlflowClient()
    for trial, status, state in zip(
        trials, ["FINISHED", "FAILED", "FAILED"], ["complete", "failed", "failed"], strict=True
    ):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert (run.info.status, run.data.tags["sweep.state"]) == (status, state)
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
    assert "non-finite" in client.get_run(trials[2].user_attrs["mlflow_run_id"]).data.tags["sweep.failure"]
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.trials.fail"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "sweep/best_value")] == [0, 1, 2]


def test_a_bad_space_exits_2_before_any_run(tiny_data, tmp_path, tracking_uri, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.lrr: {type: float, low: 0.01, high: 0.1}\n")
    experiment = f"bad-space-{uuid.uuid4().hex[:8]}"
    argv = ["--space", str(space), "--data", str(tiny_data), "--experiment", experiment]
    assert sweep_entry.main(argv) == 2
    assert f"{space}: params: unknown config key 'train.lrr'" in capsys.readouterr().err
    assert MlflowClient().get_experiment_by_name(experiment) is None


def test_a_trial_whose_tracking_the_server_lacks_gives_exit_3_and_its_sync_command(tiny_data, tmp_path, tracking_uri):
    """With no time given to deliver its journal (``--tracking-timeout 0``), a trial ends with records only on disk:
    the study still completes, and the sweep exits 3 naming the command that uploads the rest, as ``train`` does."""
    from entrypoints import sync_tracking

    name = f"undelivered-{uuid.uuid4().hex[:8]}"
    argv = ["--space", str(CONFIG_DIR / "sweeps" / "synthetic.yaml"), "--n-trials", "1", "--study", name]
    argv += ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--config", str(CONFIG_DIR / "tiny.yaml")]
    argv += ["--data", str(tiny_data), "--registered-model", "", "--experiment", name, "--tracking-timeout", "0"]
    argv += ["--overrides", f"{TINY_TRIAL} train.output_dir={tmp_path / 'out'}"]
    assert sweep_entry.main(argv) == 3
    (journal,) = (tmp_path / "out").glob("*/tracking")
    (trial,) = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    assert trial.state == TrialState.COMPLETE
    assert sync_tracking.main([str(journal)]) == 0
    run_id = trial.user_attrs["mlflow_run_id"]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    history = MlflowClient().get_metric_history(run_id, "val/mIoU")  # the trial's value is its best validation
    assert [m.step for m in history] == [1, 2] and max(m.value for m in history) == trial.value
