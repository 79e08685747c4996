"""The ``sync_tracking`` step: deliver what a training left in its tracking journal."""

from __future__ import annotations

from pathlib import Path

from segmentation.mlops.runs import TrackingIncompleteError, sync_journal
from segmentation.mlops.tracker import Tracker


def sync_tracking_step(directory: str | Path, tracking_uri: str | None = None, timeout: float = 600.0) -> Tracker:
    """Send the journal in ``directory`` in order; returns the tracker when everything was delivered.

    Raises:
        FileNotFoundError: no journal there.
        TrackingIncompleteError: records are still undelivered or were rejected (the message says how many).
    """
    tracker = sync_journal(directory, tracking_uri, timeout)
    journal = tracker.journal
    if journal.pending or journal.rejected:
        raise TrackingIncompleteError(
            f"run {tracker.run_id}: {journal.pending} record(s) still undelivered to {tracker.tracking_uri} "
            f"({journal.last_error}), {journal.rejected} rejected (see {journal.directory}/rejected.jsonl); run the "
            f"command again when the server is up"
        )
    return tracker
