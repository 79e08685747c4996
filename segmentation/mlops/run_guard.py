"""What may be resumed, and the lock that keeps one training per run.

:func:`check_resumable` refuses a run id before anything is written to it: only a training run (tag
``segmentation.run_kind=train``; runs of older versions: the ``train`` entry point or a ``segmentation.checkpoint_dir``
tag) of the experiment the resume logs into, trained with a compatible config (:data:`RESUME_KEYS`), and holding a
checkpoint (local or in its artifacts). A training holds its run's lock (:func:`run_lock`, a run tag, see
:mod:`segmentation.mlops.locks`) from start to end, so a second resume of a run that is training is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

from segmentation.config import Config, flatten
from segmentation.mlops.locks import LockHeldError, TagLock
from segmentation.mlops.run_setup import CONFIG_PARAM_PREFIX
from segmentation.training.checkpoint import ARTIFACT_DIR, CHECKPOINT_DIR, list_checkpoints

RUN_KIND_TAG = "segmentation.run_kind"
TRAIN_KIND = "train"
RUN_LOCK_TAG = "segmentation.run_lock"
CHECKPOINT_DIR_TAG = "segmentation.checkpoint_dir"  # set by every training since before run kinds existed
# What a checkpoint must agree with: the weights' shapes (arch, classes), what the classes and samples mean (split
# table, training split) and the optimizer state's layout. Learning rate, epochs, batch size, augmentation... may
# change on resume (a longer schedule is a common reason to resume); data.root may differ between machines.
RESUME_KEYS = ("model.arch", "model.num_classes", "data.split_id", "data.train_split", "optimizer.name")

_held: dict[str, TagLock] = {}


def resume_experiment(client: MlflowClient, name: str) -> tuple[str | None, str]:
    """``(id or None, description)`` of the experiment a resume logs into: ``mlflow run``'s
    (``MLFLOW_EXPERIMENT_ID``), else the one called ``name`` (None when it does not exist)."""
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
        return experiment_id, f"experiment {experiment_id} (MLFLOW_EXPERIMENT_ID, set by `mlflow run`)"
    found = client.get_experiment_by_name(name)
    return (found.experiment_id if found else None), f"experiment {name!r}"


def _training_marker(run: Run) -> str | None:
    """Why ``run`` is not a training run, or None when it is one."""
    tags = run.data.tags
    kind, entry_point = tags.get(RUN_KIND_TAG), tags.get(MLFLOW_PROJECT_ENTRY_POINT)
    if kind is not None and kind != TRAIN_KIND:
        return f"it is a {kind!r} run ({RUN_KIND_TAG}={kind})"
    if entry_point is not None and entry_point != "train":
        return f"it was made by the {entry_point!r} entry point"
    if kind is None and entry_point is None and CHECKPOINT_DIR_TAG not in tags:
        return f"it is not a training run (no {RUN_KIND_TAG}={TRAIN_KIND} tag)"
    return None


def _config_differences(run: Run, cfg: Config) -> list[str]:
    params, ours = run.data.params, flatten(cfg, CONFIG_PARAM_PREFIX)
    keys = [CONFIG_PARAM_PREFIX + k for k in RESUME_KEYS]
    return [f"{k}: run has {params[k]!r}, this config {str(ours[k])!r}" for k in keys if params[k] != str(ours[k])]


def _has_checkpoint(client: MlflowClient, run: Run, cfg: Config) -> bool:
    run_id = run.info.run_id
    folders = {Path(cfg.train.output_dir) / run_id / CHECKPOINT_DIR}
    if run.data.tags.get(CHECKPOINT_DIR_TAG):
        folders.add(Path(run.data.tags[CHECKPOINT_DIR_TAG]))
    if any(list_checkpoints(folder) for folder in folders):
        return True
    return any(Path(a.path).name.startswith("step-") for a in client.list_artifacts(run_id, ARTIFACT_DIR))


def check_resumable(
    client: MlflowClient, run_id: str, experiment: tuple[str | None, str], cfg: Config | None = None
) -> Run:
    """The run, if ``run_id`` may be resumed into ``experiment`` (from :func:`resume_experiment`) with ``cfg``.

    Reads only: a refused run is left as it was.

    Raises:
        ValueError: the run does not exist, is deleted, is not a training run, belongs to another experiment, was
            trained with a config that differs in :data:`RESUME_KEYS`, or has no checkpoint (each message says which).
    """
    where = f"tracking server {client.tracking_uri}"
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"cannot resume: run id {run_id!r} does not exist on {where}") from None
    prefix = f"cannot resume run {run_id}"
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"{prefix}: it is deleted; restore it first (`mlflow runs restore --run-id {run_id}`)")
    if (reason := _training_marker(run)) is not None:
        raise ValueError(f"{prefix}: {reason}; only runs of the train step can be resumed")
    experiment_id, described = experiment
    if run.info.experiment_id != experiment_id:
        owner = client.get_experiment(run.info.experiment_id).name
        raise ValueError(
            f"{prefix}: it belongs to experiment {owner!r} (id {run.info.experiment_id}) but this training logs "
            f"into {described}; resume it in its own experiment (--experiment {owner!r}, or mlflow run "
            f"--experiment-name {owner!r})"
        )
    if cfg is None:
        return run
    missing = [CONFIG_PARAM_PREFIX + k for k in RESUME_KEYS if CONFIG_PARAM_PREFIX + k not in run.data.params]
    if missing:
        raise ValueError(
            f"{prefix}: it never logged its config ({', '.join(missing)} missing): it stopped before training "
            "began, so there is nothing to resume; start a new run"
        )
    if differences := _config_differences(run, cfg):
        raise ValueError(
            f"{prefix}: its checkpoints do not fit this config ({'; '.join(differences)}); resume with the run's "
            f"config (its artifact config/resolved.yaml) or start a new run"
        )
    if not _has_checkpoint(client, run, cfg):
        raise ValueError(
            f"{prefix}: no complete checkpoint in {Path(cfg.train.output_dir) / run_id / CHECKPOINT_DIR} nor under "
            f"its '{ARTIFACT_DIR}/' artifacts (it stopped before the first checkpoint); start a new run"
        )
    return run


def run_lock(client: MlflowClient, run_id: str) -> TagLock:
    """The lock of run ``run_id`` (tag ``segmentation.run_lock``)."""

    def read() -> str | None:
        return client.get_run(run_id).data.tags.get(RUN_LOCK_TAG)

    return TagLock(
        f"run {run_id}",
        read,
        lambda value: client.set_tag(run_id, RUN_LOCK_TAG, value),
        lambda: client.delete_tag(run_id, RUN_LOCK_TAG),
    )


def hold_run_lock(client: MlflowClient, run_id: str, new: bool) -> None:
    """Take run ``run_id``'s lock for this process until :func:`release_run_lock`.

    ``new``: the run was just created, nobody else can hold or race for it.

    Raises:
        ValueError: another live training holds it (the message names the process and host).
    """
    lock = run_lock(client, run_id)
    try:
        lock.try_acquire(settle=not new)
    except LockHeldError as exc:
        raise ValueError(
            f"cannot resume run {run_id}: another training of it is running ({exc}). Wait for it to end; if that "
            f"process is gone on another host, its lock frees itself {lock.stale_after_s:.0f} s after its last "
            f"heartbeat (or delete the run tag {RUN_LOCK_TAG})"
        ) from None
    _held[run_id] = lock


def release_run_lock(run_id: str | None) -> None:
    """Release the lock :func:`hold_run_lock` took for ``run_id`` (no-op when none is held)."""
    lock = _held.pop(run_id, None) if run_id else None
    if lock is not None:
        lock.release()
