"""The Optuna side of a sweep with real Optuna studies (in memory or sqlite): storage defaults and errors, the pruning
hook, how trials are counted, the prediction grid; and every ``sweep`` MLproject parameter reaching the step."""

from __future__ import annotations

import shlex

import numpy as np
import optuna
import pytest
from mlflow.projects import _project_spec
from optuna.trial import TrialState

from entrypoints import sweep as sweep_entry
from segmentation.data.classes import ClassInfo
from segmentation.mlops.sweep import FAILURE_ATTR, PruningReporter, default_storage, open_study, progress, redact
from segmentation.mlops.sweep_report import render_grid
from segmentation.training.search_space import SearchSpace

SPACE = SearchSpace(path=None, params=())


def test_default_storage_sits_beside_a_sqlite_store_else_in_the_working_directory():
    assert default_storage("sqlite:////srv/mlflow/mlflow.db") == "sqlite:////srv/mlflow/optuna.db"
    assert default_storage("http://127.0.0.1:5000") == "sqlite:///optuna.db"


def test_redact_hides_the_password():
    assert (
        redact("postgresql+psycopg2://alice:s3cret@db:5432/optuna") == "postgresql+psycopg2://alice:***@db:5432/optuna"
    )


def test_bad_storage_urls_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a database URL; expected e.g. sqlite:///"):
        open_study("s", "optuna.db", SPACE, 1, 3, "http://x")
    with pytest.raises(ConnectionError, match=r"postgresql\+psycopg2://postgres@127.0.0.1:1/x is not reachable"):
        open_study("s", "postgresql+psycopg2://postgres@127.0.0.1:1/x", SPACE, 1, 3, "http://x")


def test_a_study_that_minimises_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="minimize")
    with pytest.raises(ValueError, match="minimises"):
        open_study("s", storage, SPACE, 1, 3, "http://x")


def test_the_reporter_prunes_below_the_median_and_keeps_the_best_value():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    good = PruningReporter(first)
    assert good(1, {"val/mIoU": 0.5}) is False and good(2, {"val/mIoU": 0.4}) is False
    assert (good.best, good.best_step) == (0.5, 1)
    study.tell(first, good.best)
    bad = PruningReporter(study.ask())
    assert bad(1, {"val/mIoU": 0.1}) is True
    assert bad.pruned_at == 1


def test_progress_counts_what_ends_a_study_and_not_trials_lost_with_their_worker():
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    study.tell(study.ask(), state=TrialState.PRUNED)
    diverged = study.ask()
    diverged.set_user_attr(FAILURE_ATTR, "FloatingPointError: non-finite loss")
    study.tell(diverged, state=TrialState.FAIL)
    study.tell(study.ask(), state=TrialState.FAIL)  # a lost worker's trial: replaced, not counted
    study.ask()  # running
    assert progress(study) == (3, 1)


def test_the_grid_puts_the_same_images_side_by_side():
    classes = ClassInfo.cityscapes()
    image = np.zeros((64, 128, 3), np.uint8)
    mask = np.zeros((64, 128), np.uint8)
    grid = render_grid([(image, mask)] * 2, [("trial 1", [mask, mask]), ("trial 0", [mask + 1, mask])], classes)
    assert grid.dtype == np.uint8 and grid.shape == (24 + 2 * (128 + 4), 4 * (256 + 4), 3)
    # Row 0, third column (trial 1) is road; the fourth (trial 0) predicts sidewalk: their colours differ.
    assert tuple(grid[24 + 60, 2 * 260 + 100]) == classes.colors[0]
    assert tuple(grid[24 + 60, 3 * 260 + 100]) == classes.colors[1]


# Every sweep parameter set to a value other than its default; where it must arrive in SweepParams.
VALUES = {
    "space": "configs/sweeps/hardnet_cityscapes.yaml",
    "n_trials": "7",
    "study": "team-study",
    "storage": "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna",
    "config": "configs/tiny.yaml",
    "data": "/data/out",
    "overrides": "train.max_steps=50 system.num_workers=2",
    "registered_model": "my-model",
    "heartbeat_interval": "3",
    "grace_period": "9",
}


def test_every_sweep_parameter_is_a_flag_and_reaches_the_step(repo, monkeypatch, tmp_path):
    entry = _project_spec.load_project(str(repo)).get_entry_point("sweep")
    assert set(entry.parameters) == set(VALUES), "a new sweep parameter needs a row in VALUES"
    for param, value in VALUES.items():
        assert str(entry.parameters[param].default) != value, f"pick a non-default test value for {param}"
    words = shlex.split(entry.compute_command(VALUES, storage_dir=str(tmp_path)))
    assert words[:3] == ["python", "-m", "entrypoints.sweep"]
    received = []
    monkeypatch.setattr(sweep_entry, "sweep_step", received.append)
    assert sweep_entry.main(words[3:]) == 0
    params = received[0]
    assert {name: str(getattr(params, name)) for name in VALUES} == VALUES
