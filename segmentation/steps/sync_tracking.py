"""The ``sync_tracking`` step: deliver what a training left in its tracking journal."""

from __future__ import annotations

from pathlib import Path

from segmentation.mlops.connection import TrackingIncompleteError
from segmentation.mlops.runs import sync_journal
from segmentation.mlops.tracker import Tracker


def sync_tracking_step(directory: str | Path, tracking_uri: str | None = None, timeout: float = 600.0) -> Tracker:
    """Send the journal in ``directory`` in order; returns the tracker when everything was delivered.

    Raises:
        FileNotFoundError: no journal there.
        JournalError: the journal folder is unusable (a corrupt ``run.json`` or cursor; the message names the file).
        TrackingIncompleteError: records are still undelivered, quarantined or rejected (the message says how many
            and where they are kept).
    """
    tracker = sync_journal(directory, tracking_uri, timeout)
    report = tracker.undelivered()
    if report:
        journal = tracker.journal
        missing = journal.pending + journal.quarantined + journal.rejected
        raise TrackingIncompleteError(
            f"run {tracker.run_id}: {missing} record(s) of journal {journal.directory} not delivered: {report}"
        )
    return tracker
