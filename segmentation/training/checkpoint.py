"""Training checkpoints: Accelerate ``save_state`` folders written atomically, pruned, mirrored to MLflow.

Layout: ``<directory>/step-0000042/`` holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer, scheduler, RNG state of every rank) plus ``trainer_state.json``. A folder is first written
as ``.tmp-step-…`` and renamed when complete, so a process killed during a save leaves the previous checkpoint
as the last complete one (resume ignores ``.tmp-*`` folders). Before the rename every file in it and the folder are
fsynced, and the parent after it, so a power loss cannot leave a renamed folder with missing data.
``trainer_state.json`` lists the size of every file ``save_state`` wrote: :func:`checkpoint_problem` finds a missing
or truncated file (and a corrupt state file or safetensors header) without loading anything, and resume skips such a
checkpoint for the one before it. The same folders are uploaded as run artifacts under ``checkpoints/`` in the
background (through the tracker's journal, so a tracking outage does not stop the saves); when no local checkpoint
is usable, resume downloads the last complete one from the run.

The ``accelerator`` arguments are duck-typed (``save_state``, ``load_state``, ``wait_for_everyone``,
``is_main_process``) so that Accelerate itself stays inside ``engine.py``; the uploads go to an
:class:`~segmentation.training.hooks.ArtifactStore`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from segmentation.io import write_text_atomic
from segmentation.training.hooks import ArtifactStore

logger = logging.getLogger(__name__)

# A training's output folder, <output_dir>/<run_id>/: checkpoints/, the model package model/, the journal tracking/.
ARTIFACT_DIR = "checkpoints"
CHECKPOINT_DIR = "checkpoints"
MODEL_PACKAGE_DIR = "models"  # one model package per kept checkpoint, logged as a LoggedModel of the run
JOURNAL_DIR = "tracking"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
_NAME = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainerState:
    """What the loop needs beyond Accelerate's state to continue exactly where it stopped."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of ``epoch`` already consumed (for a mid-epoch resume)
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # [{"step": s, "value": v}] of the monitor
    early_stopping_counter: int = 0
    early_stopping_best: float | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics at the time of the save
    files: dict[str, int] = field(default_factory=dict)  # bytes of each file save_state wrote (checked on resume)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=True)

    @classmethod
    def read(cls, path: str | Path) -> TrainerState:
        return cls(**json.loads(Path(path).read_text()))


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def logged_model_name(checkpoint: str | Path) -> str:
    """The name of a checkpoint's LoggedModel in the run, e.g. ``checkpoint-step-0000300``."""
    return f"checkpoint-{Path(checkpoint).name}"


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (NaN never improves)."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (header unreadable, data cut short), from its header alone."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            return f"{path.name} is truncated ({size} bytes, shorter than its header)"
        try:
            header = json.loads(fh.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has an unreadable header"
    if size != 8 + length + end:
        return f"{path.name} has {size} bytes, its header describes {8 + length + end}"
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, found without loading it; None when it is complete.

    Checks that ``trainer_state.json`` parses, that every file it lists has the size that was written, and that
    ``model.safetensors`` is whole according to its own header.
    """
    checkpoint = Path(checkpoint)
    try:
        state = TrainerState.read(checkpoint / STATE_FILE)
    except FileNotFoundError:
        return f"no {STATE_FILE} (the save did not finish)"
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError; TypeError: unknown or missing fields
        return f"{STATE_FILE} is corrupt ({exc})"
    for name, size in state.files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    if not (checkpoint / WEIGHTS_FILE).is_file():
        return f"{WEIGHTS_FILE} is missing"
    return _safetensors_problem(checkpoint / WEIGHTS_FILE)


def _step_folders(directory: Path) -> list[Path]:
    found = [p for p in directory.iterdir() if _NAME.match(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary, foreign and damaged folders are ignored)."""
    return [p for p in _step_folders(Path(directory)) if checkpoint_problem(p) is None]


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # a platform that cannot open folders (Windows) cannot fsync them either
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then its subfolders and itself (their entries)."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_file():
            _fsync(path)
    for path in [p for p in paths if p.is_dir()] + [folder]:
        _fsync(path)


def load_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint folder (safetensors: no pickle involved)."""
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in checkpoint {checkpoint}; is it a training checkpoint folder?")
    state = load_file(str(path), device="cpu")
    # Under DDP Accelerate saves the wrapped model, whose keys start with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


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
            _fsync(tmp)
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync(self.directory)  # the rename itself
            _fsync(self.directory.parent)  # checkpoints/ itself, created by the first save
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
        for local in reversed(_step_folders(self.directory)):
            if self._usable(local, local):
                return local
        names = [Path(p).name for p in self.store.list_artifacts(ARTIFACT_DIR)]
        for name in sorted((n for n in names if _NAME.match(n)), reverse=True):
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
            _fsync(self.directory)
            shutil.rmtree(staging, ignore_errors=True)
            logger.info("downloaded checkpoint %s from run %s", name, self.store.run_id)
            return target
        return None
