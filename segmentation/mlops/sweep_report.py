"""What a sweep's parent run shows once the study is done: the trials table, the best trial, Optuna's plots, the
validation images as the top trials predict them side by side (MLflow's UI cannot compare images across runs), and
the best trial's model registered and tagged with the study.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib
import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState

from segmentation.data.classes import ClassInfo, colorize
from segmentation.mlops.registry import filter_literal
from segmentation.mlops.sweep import FAILURE_ATTR, METRIC, PARENT_ATTR, RUN_ATTR, STUDY_TAG, TRIAL_TAG, WORKER_ATTR
from segmentation.training.checkpoint import checkpoint_name, logged_model_name

logger = logging.getLogger(__name__)

SUMMARY_DIR = "sweep"
PREDICTIONS_DIR = "sweep/predictions"  # on each complete trial's run: <index>.png class ids of the grid images
GRID_FILE = "sweep/top_trials.png"
TOP_TRIALS = 3
GRID_IMAGES = 4
_TILE_WIDTH = 256


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, duration, the searched values and where it is tracked."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = {
            "trial": t.number,
            "state": t.state.name,
            METRIC: t.value,
            "last_step": t.last_step,
            "duration_s": duration,
            "mlflow_run_id": t.user_attrs.get(RUN_ATTR),
            "parent_run_id": t.user_attrs.get(PARENT_ATTR),
            "worker": t.user_attrs.get(WORKER_ATTR),
            "failure": t.user_attrs.get(FAILURE_ATTR),
        }
        rows.append(row | {f"param.{k}": v for k, v in t.params.items()})
    return pd.DataFrame(rows)


def top_trials(study: optuna.Study, k: int = TOP_TRIALS) -> list[optuna.trial.FrozenTrial]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(complete, key=lambda t: t.value, reverse=True)[:k]


def log_summary(run_id: str, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """Log the trials table (MLflow table and CSV), the best trial's params and score, and Optuna's plots.

    Returns:
        The best complete trial, or None when no trial completed.
    """
    client = MlflowClient()
    table = trials_table(study)
    client.log_table(run_id, data=table.astype(object).where(table.notna(), None), artifact_file="sweep/trials.json")
    client.log_text(run_id, table.to_csv(index=False), "sweep/trials.csv")
    counts = table["state"].value_counts().to_dict() if len(table) else {}
    tags = {f"sweep.trials.{state.lower()}": str(n) for state, n in counts.items()}
    best = top_trials(study, 1)
    if not best:
        logger.warning("no trial of study %s completed: no best trial to report", study.study_name)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return None
    best = best[0]
    existing = client.get_run(run_id).data.params
    params = [Param(f"best.{k}", str(v)) for k, v in best.params.items() if f"best.{k}" not in existing]
    tags |= {"sweep.best_trial": str(best.number), "sweep.best_run_id": str(best.user_attrs.get(RUN_ATTR))}
    client.log_batch(
        run_id,
        metrics=[Metric(f"best/{METRIC}", float(best.value), int(time.time() * 1000), 0)],
        params=params,
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    _log_plots(client, run_id, study)
    return best


def _log_plots(client: MlflowClient, run_id: str, study: optuna.Study) -> None:
    """Optimisation history, parameter importances and parallel coordinates as PNGs (each skipped, with a
    warning, when the study cannot draw it yet, e.g. importances before two trials completed)."""
    matplotlib.use("Agg")  # no display on servers; must precede pyplot's first import
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    drawers = {
        "optimization_history": plots.plot_optimization_history,
        "param_importances": plots.plot_param_importances,
        "parallel_coordinate": plots.plot_parallel_coordinate,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in drawers.items():
            try:
                with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                logger.warning("plot %s skipped: %s", name, exc)
                continue
            figure = np.ravel(axes)[0].figure
            path = Path(tmp) / f"{name}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            client.log_artifact(run_id, str(path), SUMMARY_DIR)


def log_predictions(run_id: str, masks: Sequence[np.ndarray]) -> None:
    """Store a trial's predicted class ids of the grid images (lossless PNGs) on its run."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, mask in enumerate(masks):
            cv2.imwrite(str(Path(tmp) / f"{i}.png"), mask.astype(np.uint8))
        MlflowClient().log_artifacts(run_id, tmp, PREDICTIONS_DIR)


def _download_predictions(client: MlflowClient, run_id: str, count: int) -> list[np.ndarray] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, PREDICTIONS_DIR, tmp))
        except Exception as exc:  # noqa: BLE001 - a trial without predictions is left out of the grid
            logger.warning("no predictions on run %s (%s): left out of the grid", run_id, exc)
            return None
        masks = [cv2.imread(str(local / f"{i}.png"), cv2.IMREAD_UNCHANGED) for i in range(count)]
    return None if any(m is None for m in masks) else masks


def _tile(image_rgb: np.ndarray, nearest: bool) -> np.ndarray:
    height = max(1, round(image_rgb.shape[0] * _TILE_WIDTH / image_rgb.shape[1]))
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(image_rgb, (_TILE_WIDTH, height), interpolation=mode)


def render_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], columns: Sequence[tuple[str, Sequence[np.ndarray]]], classes
) -> np.ndarray:
    """Rows of ``image | ground truth | column 1 | column 2 ...`` (RGB uint8), each column headed by its title.

    Args:
        samples: ``(image BGR uint8, mask uint8)`` per row.
        columns: ``(title, one predicted mask per row)``.
        classes: a :class:`~segmentation.data.classes.ClassInfo` for the colours.
    """
    titles = ["image", "ground truth", *(title for title, _ in columns)]
    rows = []
    for i, (image, mask) in enumerate(samples):
        tiles = [_tile(image[..., ::-1], False), _tile(colorize(mask, classes), True)]
        tiles += [_tile(colorize(masks[i], classes), True) for _, masks in columns]
        rows.append(np.hstack([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles]))
    grid = np.vstack(rows)
    head = np.full((24, grid.shape[1], 3), 255, np.uint8)
    for j, title in enumerate(titles):
        cv2.putText(head, title, (j * (_TILE_WIDTH + 4) + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    return np.ascontiguousarray(np.vstack([head, grid]))


def log_prediction_grid(
    run_id: str, study: optuna.Study, samples: Sequence[tuple[np.ndarray, np.ndarray]], classes: ClassInfo
) -> bool:
    """Log :data:`GRID_FILE`: the grid images as the top complete trials predict them. False when none has
    predictions to show."""
    client = MlflowClient()
    columns = []
    for trial in top_trials(study):
        masks = _download_predictions(client, trial.user_attrs.get(RUN_ATTR, ""), len(samples))
        if masks is not None:
            columns.append((f"trial {trial.number}: {METRIC} {trial.value:.3f}", masks))
    if not columns or not samples:
        return False
    client.log_image(run_id, render_grid(samples, columns, classes), artifact_file=GRID_FILE)
    return True


def register_best(
    best: optuna.trial.FrozenTrial, registered_model: str, parent_run_id: str, study_name: str, storage: str
) -> str | None:
    """Register the best trial's logged model (once per study) and tag the version with the study.

    The worker that ran the best trial registers it; another worker does so only when that worker's run is no
    longer RUNNING (it died) and no version of the trial's run exists yet.

    Returns:
        The version, or None when the best trial's own worker will register it.
    """
    client = MlflowClient()
    run_id, owner = best.user_attrs.get(RUN_ATTR), best.user_attrs.get(PARENT_ATTR)
    if not run_id or not owner:
        logger.warning("best trial %d was not run by a sweep worker (no MLflow run): not registered", best.number)
        return None
    query = f"name = {filter_literal(registered_model)} and run_id = {filter_literal(run_id)}"
    existing = client.search_model_versions(query)
    if existing:
        return str(max(int(v.version) for v in existing))
    if owner != parent_run_id and client.get_run(owner).info.status == "RUNNING":
        logger.info("trial %d is registered by its own worker (run %s)", best.number, owner)
        return None
    run = client.get_run(run_id)
    step = best.user_attrs.get("best_step", best.last_step)
    # Each checkpoint of a trial is a LoggedModel; the one of the trial's best validation is registered.
    name = logged_model_name(checkpoint_name(int(step)))
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    if not models:  # that checkpoint was pruned (callbacks.checkpoint.top_k=0): the best model the trial kept
        kept = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        scored = [(max((m.value for m in k.metrics if m.key == METRIC), default=-math.inf), k) for k in kept]
        models = [max(scored, key=lambda pair: pair[0])[1]] if scored else []
    if not models:
        raise RuntimeError(f"the best trial {best.number} (run {run_id}) logged no model {name!r} to register")
    tags = {
        METRIC: best.value,
        "run_id": run_id,
        "step": step,
        STUDY_TAG: study_name,
        TRIAL_TAG: best.number,
        "sweep.storage": storage,
    }
    version = mlflow.register_model(
        f"models:/{models[0].model_id}", registered_model, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def trial_metrics(trial_value: float, best_value: float | None) -> dict[str, float]:
    """The parent run's per-trial curve: this trial's score and the study's best so far."""
    out = {"sweep/trial_value": trial_value} if math.isfinite(trial_value) else {}
    return out | ({"sweep/best_value": best_value} if best_value is not None else {})
