"""Training checkpoint folders: their layout, the trainer state saved beside Accelerate's, and the checks that tell
a complete checkpoint from a damaged one.

Layout: ``<directory>/step-0000042/`` holds what ``accelerator.save_state`` writes (model weights as
safetensors, optimizer, scheduler, RNG state of every rank) plus ``trainer_state.json``, which lists the size of every
file ``save_state`` wrote: :func:`checkpoint_problem` finds a missing or truncated file (and a corrupt state file or
safetensors header) without loading anything, and resume skips such a checkpoint for the one before it.
:class:`~segmentation.training.checkpoint_manager.CheckpointManager` writes, prunes, uploads and fetches the folders.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

# A training's output folder, <output_dir>/<run_id>/: checkpoints/, the model package model/, the journal tracking/.
ARTIFACT_DIR = "checkpoints"
CHECKPOINT_DIR = "checkpoints"
MODEL_PACKAGE_DIR = "models"  # one model package per kept checkpoint, logged as a LoggedModel of the run
JOURNAL_DIR = "tracking"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
STEP_FOLDER = re.compile(r"^step-(\d{7,})$")


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


def step_folders(directory: Path) -> list[Path]:
    """Every ``step-*`` folder in ``directory``, oldest first, complete or not."""
    found = [p for p in directory.iterdir() if STEP_FOLDER.match(p.name)] if directory.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_FOLDER.match(p.name).group(1)))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary, foreign and damaged folders are ignored)."""
    return [p for p in step_folders(Path(directory)) if checkpoint_problem(p) is None]


def load_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint folder (safetensors: no pickle involved)."""
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in checkpoint {checkpoint}; is it a training checkpoint folder?")
    state = load_file(str(path), device="cpu")
    # Under DDP Accelerate saves the wrapped model, whose keys start with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}
