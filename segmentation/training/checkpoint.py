"""Training checkpoints: Accelerate ``save_state`` folders written atomically, pruned, mirrored to MLflow.

Layout: ``<directory>/step-0000042/`` holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer, scheduler, RNG state of every rank) plus ``trainer_state.json``. A folder is first written
as ``.tmp-step-…`` and renamed when complete, so a process killed during a save leaves the previous checkpoint
as the last complete one (resume ignores ``.tmp-*`` folders). The same folders are uploaded as run artifacts under
``checkpoints/`` in the background (through the tracker's journal, so a tracking outage does not stop the saves);
when the local folder is gone, resume downloads the last complete one from the run.

The ``accelerator`` arguments are duck-typed (``save_state``, ``load_state``, ``wait_for_everyone``,
``is_main_process``) so that Accelerate itself stays inside ``engine.py``; the uploads go to an
:class:`~segmentation.training.hooks.ArtifactStore`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary and foreign folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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
            write_text_atomic(tmp / STATE_FILE, state.to_json())
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            tmp.rename(final)
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

    def fetch_last(self) -> Path | None:
        """The last complete checkpoint: local, or else downloaded from the run's ``checkpoints/`` artifacts.

        Call on the main rank only (it talks to MLflow).
        """
        local = self.last()
        if local is not None:
            return local
        names = [Path(p).name for p in self.store.list_artifacts(ARTIFACT_DIR)]
        for name in sorted((n for n in names if _NAME.match(n)), reverse=True):
            files = {Path(p).name for p in self.store.list_artifacts(f"{ARTIFACT_DIR}/{name}")}
            if STATE_FILE not in files:
                continue  # an upload cut short
            staging = self.directory / f".download-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            downloaded = self.store.download_artifacts(f"{ARTIFACT_DIR}/{name}", staging)
            downloaded.rename(self.directory / name)
            shutil.rmtree(staging, ignore_errors=True)
            logger.info("downloaded checkpoint %s from run %s", name, self.store.run_id)
            return self.directory / name
        return None
