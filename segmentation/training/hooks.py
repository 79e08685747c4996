"""What training needs from the outside world, as protocols: where artifacts go and where a run is recorded.

The library never imports MLflow: :func:`segmentation.training.engine.fit` receives a :class:`RunTracker` (the MLflow
one is :class:`segmentation.mlops.tracker.Tracker`) and
:class:`~segmentation.training.checkpoint_manager.CheckpointManager` an :class:`ArtifactStore`. :class:`NullTracker`
records nothing (untracked trainings, tests).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ArtifactStore(Protocol):
    """Where checkpoint folders are mirrored, so that a resume on another machine finds them."""

    run_id: str | None

    def log_artifacts(self, local_dir: str | Path, artifact_path: str, last: str | None = None) -> None: ...

    def delete_artifacts(self, path: str) -> None: ...

    def list_artifacts(self, path: str) -> list[str]: ...

    def download_artifacts(self, path: str, dst_dir: str | Path) -> Path: ...

    def log_model(self, package: str | Path, step: int, name: str) -> None: ...

    def delete_model(self, name: str, package: str | Path) -> None: ...


class RunTracker(ArtifactStore, Protocol):
    """The record of one training: params, datasets, metrics, images, models and the final status."""

    enabled: bool
    tracking_uri: str | None
    model_version: str | None

    def log_config(self, cfg: Any) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_dataset(self, table: Any, source: str, name: str, context: str, log: bool = True) -> tuple[str, str]: ...

    @property
    def dataset_digest(self) -> str | None: ...

    def skip_logged_steps(self) -> None: ...

    def open_journal(self, directory: str | Path) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, dataset: tuple[str, str] | None = None) -> None: ...

    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...

    def register_model(self, name: str, registered_model: str, version_tags: Mapping[str, Any]) -> None: ...

    def end(self, status: str = "FINISHED", timeout: float = 120.0) -> bool: ...


class NullTracker:
    """A :class:`RunTracker` that records nothing (every rank but the main one, and untracked trainings)."""

    enabled = False
    run_id = None
    tracking_uri = None
    model_version = None
    dataset_digest = None

    def log_config(self, cfg: Any) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_dataset(self, table: Any, source: str, name: str, context: str, log: bool = True) -> tuple[str, str]:
        return name, ""

    def skip_logged_steps(self) -> None:
        return None

    def open_journal(self, directory: str | Path) -> None:
        return None

    def log_metrics(
        self, metrics: Mapping[str, float], step: int, dataset: tuple[str, str] | None = None, model: str | None = None
    ) -> None:
        return None

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        return None

    def log_artifacts(self, local_dir: str | Path, artifact_path: str, last: str | None = None) -> None:
        return None

    def delete_artifacts(self, path: str) -> None:
        return None

    def list_artifacts(self, path: str) -> list[str]:
        return []

    def download_artifacts(self, path: str, dst_dir: str | Path) -> Path:
        raise FileNotFoundError(f"an untracked training has no artifact {path!r}")

    def log_model(self, package: str | Path, step: int, name: str) -> None:
        return None

    def register_model(self, name: str, registered_model: str, version_tags: Mapping[str, Any]) -> None:
        return None

    def delete_model(self, name: str, package: str | Path) -> None:
        shutil.rmtree(package, ignore_errors=True)  # nothing was logged: only the local package goes

    def end(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        return True
