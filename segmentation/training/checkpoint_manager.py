"""Saving, pruning, mirroring and fetching training checkpoints (their folder format: :mod:`.checkpoint`).

A folder is first written as ``.tmp-step-…`` and renamed when complete, so a process killed during a save leaves the
previous checkpoint as the last complete one (resume ignores ``.tmp-*`` folders). Before the rename every file in it
and the folder are fsynced, and the parent after it, so a power loss cannot leave a renamed folder with missing data.
The same folders are uploaded as run artifacts under ``checkpoints/`` in the background (through the tracker's
journal, so a tracking outage does not stop the saves); when no local checkpoint is usable, resume downloads the last
complete one from the run.

The ``accelerator`` arguments are duck-typed (``save_state``, ``load_state``, ``wait_for_everyone``,
``is_main_process``) so that this module does not depend on Accelerate; the uploads go to an
:class:`~segmentation.training.hooks.ArtifactStore`.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from segmentation.io import fsync_path, sync_tree, write_text_atomic
from segmentation.training.checkpoint import (
    ARTIFACT_DIR,
    MODEL_PACKAGE_DIR,
    STATE_FILE,
    STEP_FOLDER,
    TrainerState,
    checkpoint_name,
    checkpoint_problem,
    list_checkpoints,
    logged_model_name,
    step_folders,
)
from segmentation.training.hooks import ArtifactStore

logger = logging.getLogger(__name__)


class CheckpointManager:
    """Save, prune and upload checkpoints; find the one to resume from.

    Args:
        directory: local folder for the ``step-*`` checkpoints.
        monitor: metric that ranks checkpoints (``val/mIoU``); ``mode`` is ``max`` or ``min``.
        top_k: best checkpoints kept besides the last one.
        store: receives the uploads and the checkpoints' models (the run's tracker; a no-op one on non-main ranks).
        packages: folder of the checkpoints' model packages (``write_package`` in :meth:`save`).
    """

    def __init__(
        self,
        directory: str | Path,
        monitor: str,
        mode: str,
        top_k: int,
        store: ArtifactStore,
        packages: str | Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.packages = Path(packages) if packages else self.directory.parent / MODEL_PACKAGE_DIR
        self.monitor, self.mode, self.top_k = monitor, mode, top_k
        self.store = store
        self.damaged: dict[str, str] = {}  # checkpoint -> why resume skipped it
        self._downloaded: set[str] = set()

    def save(self, accelerator: Any, state: TrainerState, write_package: Callable[[Path], None] | None = None) -> Path:
        """Write a checkpoint of the current step on every rank; the main rank commits, prunes and uploads it.

        With ``write_package`` (main rank: it writes the model package of the current weights into the folder it is
        given) the checkpoint also becomes a LoggedModel of the run at this step, linked to the step's metrics.
        """
        final = self.directory / checkpoint_name(state.global_step)
        tmp = self.directory / f".tmp-{final.name}"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left over by a process killed during a save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            sync_tree(tmp)  # what every rank's save_state wrote
            write_text_atomic(tmp / STATE_FILE, replace(state, files=files).to_json())  # fsynced, then renamed
            fsync_path(tmp)
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(self.directory)  # the rename itself
            fsync_path(self.directory.parent)  # checkpoints/ itself, created by the first save
            # Queued: uploaded in the background, the state file last (see fetch_last).
            self.store.log_artifacts(final, f"{ARTIFACT_DIR}/{final.name}", last=STATE_FILE)
            if write_package is not None:
                package = self.packages / final.name
                write_package(package)
                self.store.log_model(package, state.global_step, logged_model_name(final))
            self._prune(state)
        accelerator.wait_for_everyone()
        return final

    def _prune(self, state: TrainerState) -> None:
        checkpoints = list_checkpoints(self.directory)
        keep = {checkpoints[-1]} if checkpoints else set()
        scored = [(TrainerState.read(p / STATE_FILE).metrics.get(self.monitor), p) for p in checkpoints]
        scored = [(v, p) for v, p in scored if v is not None and not math.isnan(v)]
        scored.sort(key=lambda vp: vp[0], reverse=self.mode == "max")
        keep |= {p for _, p in scored[: self.top_k]}
        for path in checkpoints:
            if path not in keep:
                # Queued after its upload and before the folder goes: an upload still waiting is then skipped.
                self.store.delete_artifacts(f"{ARTIFACT_DIR}/{path.name}")
                shutil.rmtree(path, ignore_errors=True)
                if (self.packages / path.name).is_dir():
                    # The store removes the package after its LoggedModel (its upload may still be queued).
                    self.store.delete_model(logged_model_name(path), self.packages / path.name)

    def best(self) -> Path | None:
        """The best kept checkpoint by the monitored metric, else the last one."""
        checkpoints = list_checkpoints(self.directory)
        scored = [(TrainerState.read(p / STATE_FILE).metrics.get(self.monitor), p) for p in checkpoints]
        scored = [(v, p) for v, p in scored if v is not None and not math.isnan(v)]
        if not scored:
            return checkpoints[-1] if checkpoints else None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda vp: vp[0])[1]

    def last(self) -> Path | None:
        checkpoints = list_checkpoints(self.directory)
        return checkpoints[-1] if checkpoints else None

    def mark_damaged(self, checkpoint: str | Path, reason: str) -> None:
        """Leave ``checkpoint`` (a local folder or an artifact path) out of later :meth:`fetch_last` calls."""
        self.damaged[str(checkpoint)] = reason

    def _usable(self, where: str | Path, folder: Path) -> bool:
        if str(where) in self.damaged:
            return False
        problem = checkpoint_problem(folder)
        if problem is not None:
            logger.warning("skipping damaged checkpoint %s: %s", where, problem)
            self.mark_damaged(where, problem)
            return False
        return True

    def fetch_last(self) -> Path | None:
        """The newest usable checkpoint: local, or else downloaded from the run's ``checkpoints/`` artifacts.

        Damaged ones (:func:`checkpoint_problem`, or :meth:`mark_damaged` after a failed load) are skipped with a
        warning naming them, and recorded in :attr:`damaged`. Call on the main rank only (it talks to MLflow).
        """
        for local in reversed(step_folders(self.directory)):
            if self._usable(local, local):
                return local
        names = [Path(p).name for p in self.store.list_artifacts(ARTIFACT_DIR)]
        for name in sorted((n for n in names if STEP_FOLDER.match(n)), reverse=True):
            remote = f"{ARTIFACT_DIR}/{name}"
            if remote in self._downloaded:
                continue  # fetched once already, and its load failed
            files = {Path(p).name for p in self.store.list_artifacts(remote)}
            if STATE_FILE not in files:
                continue  # an upload cut short
            staging = self.directory / f".download-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            downloaded = self.store.download_artifacts(remote, staging)
            self._downloaded.add(remote)
            if not self._usable(f"run artifact {remote}", downloaded):
                shutil.rmtree(staging, ignore_errors=True)
                continue
            sync_tree(downloaded)
            target = self.directory / name
            if target.exists():  # a damaged local copy: kept aside, not deleted
                aside = self.directory / f".damaged-{name}"
                shutil.rmtree(aside, ignore_errors=True)
                target.rename(aside)
            downloaded.rename(target)
            fsync_path(self.directory)
            shutil.rmtree(staging, ignore_errors=True)
            logger.info("downloaded checkpoint %s from run %s", name, self.store.run_id)
            return target
        return None
