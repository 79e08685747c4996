"""What training needs from the outside world, as protocols: where artifacts go and where a run is recorded.

The library never imports MLflow: :func:`segmentation.training.engine.fit` receives a :class:`RunTracker` (the MLflow
one is :class:`segmentation.mlops.tracker.Tracker`) and :class:`~segmentation.training.checkpoint.CheckpointManager`
an :class:`ArtifactStore`. :class:`NullTracker` records nothing (untracked trainings, tests).
"""

from __future__ import annotations

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


class RunTracker(ArtifactStore, Protocol):
    """The record of one training: params, the dataset, metrics, images, the model and the final status."""

    enabled: bool
    tracking_uri: str | None
    model_version: str | None

    def log_config(self, cfg: Any) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_dataset(self, table: Any, source: str, name: str, context: str) -> None: ...

    @property
    def dataset_digest(self) -> str | None: ...

    def skip_logged_steps(self) -> None: ...

    def open_journal(self, directory: str | Path) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, key: str, step: int) -> None: ...

    def log_model(
        self, package: str | Path, step: int, registered_model: str | None, version_tags: Mapping
    ) -> None: ...

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

    def log_dataset(self, table: Any, source: str, name: str, context: str) -> None:
        return None

    def skip_logged_steps(self) -> None:
        return None

    def open_journal(self, directory: str | Path) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
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

    def log_model(self, package: str | Path, step: int, registered_model: str | None, version_tags: Mapping) -> None:
        return None

    def end(self, status: str = "FINISHED", timeout: float = 120.0) -> bool:
        return True
