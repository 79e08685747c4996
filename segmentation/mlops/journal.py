"""A durable, ordered journal of tracking writes, sent to the tracking server by one background thread.

Training appends each write (a batch of metrics, an image, a checkpoint folder to upload...) as one JSON line to
``<directory>/journal.jsonl`` and goes on at once; a sender thread (:mod:`segmentation.mlops.journal_sender`) delivers
the records in order and moves a cursor (``<directory>/sent``, the number of lines dealt with) past each one. While
the server is unreachable the sender keeps retrying with a capped backoff, so an outage only delays the records; if it
outlasts the run, the journal stays on disk and ``python -m entrypoints.sync_tracking <directory>`` delivers the rest
later. Metric records are coalesced into one request per ``min_interval_s``; :meth:`Journal.drain` and
:meth:`Journal.close` flush without waiting.

Guarantees: a process killed at any point (``kill -9``) loses nothing already appended (every line reaches the OS
before ``append`` returns; a half-written LAST line, which has no newline, is cut off on reopen). A failed append
(disk full) raises and leaves the file as it was. A record delivered but not yet acknowledged in ``sent`` when the
process dies is delivered again: metric batches are idempotent on the server, an image would appear twice.

Nothing blocks the records behind it: a record the server refuses for good goes to ``rejected.jsonl``, one that
cannot be sent from here (a damaged line, a file it names gone) to ``quarantine.jsonl``, with the reason. Both files
keep the record; the journal itself is never rewritten. :attr:`Journal.rejected` and :attr:`Journal.quarantined`
count every record these files hold.

Reading the folder back is :mod:`segmentation.mlops.journal_file`. This module knows nothing about MLflow:
:mod:`segmentation.mlops.delivery` provides ``send``, ``is_transient``, ``check`` and ``superseded``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from segmentation.mlops.journal_file import CURSOR_FILE, JOURNAL_FILE, JournalError, read_cursor, read_journal
from segmentation.mlops.journal_sender import JournalSender


class Journal(JournalSender):
    """Append-only tracking journal with an in-order background sender.

    Args:
        directory: where ``journal.jsonl``, ``sent``, ``rejected.jsonl`` and ``quarantine.jsonl`` live (created if
            missing).
        send: delivers a list of consecutive records (one record, or several ``metrics`` records to batch);
            raises on failure.
        is_transient: whether a failure of ``send`` is worth retrying (server down, 5xx) rather than final.
        max_backoff_s: longest wait between two attempts while the server is unreachable.
        min_interval_s: shortest time between the start of a request and the next metrics request; metric records
            queued meanwhile go out together. 0 sends each one as soon as the previous request is done.
        check: raises :class:`DamagedRecord` for a record read back from the file that ``send`` could not handle.
        superseded: ``superseded(record, later_records)``: whether a record that failed for a local cause is undone
            anyway by a later one (an upload of a folder pruned since); it is then skipped rather than quarantined.

    Raises:
        JournalError: the journal or its cursor cannot be read (the message names the file and what it holds).
    """

    def __init__(
        self,
        directory: str | Path,
        send: Callable[[list[dict]], None],
        is_transient: Callable[[BaseException], bool],
        max_backoff_s: float = 5.0,
        min_interval_s: float = 0.0,
        check: Callable[[dict], None] | None = None,
        superseded: Callable[[dict, list[dict]], bool] | None = None,
    ) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / JOURNAL_FILE
        records, self._size = read_journal(path, check)
        sent = read_cursor(directory / CURSOR_FILE, len(records))
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open tracking journal {path} for writing: {exc}") from None
        super().__init__(directory, records, sent, send, is_transient, max_backoff_s, min_interval_s, superseded)
        self._thread.start()

    @property
    def records(self) -> list[dict]:
        """Every usable record ever appended (delivered or not), oldest first."""
        with self._cond:
            return [r for r in self._records if isinstance(r, dict)]

    @property
    def pending(self) -> int:
        """Journal lines not dealt with yet (neither delivered nor set aside)."""
        with self._cond:
            return len(self._records) - self._sent

    def append(self, record: dict) -> None:
        """Persist ``record`` (JSON-serialisable) and queue it for delivery; never blocks on the network.

        Raises:
            OSError: the line could not be written (disk full, file size limit...). The record is not journaled,
                the file is left as it was, and later appends work once the disk has room again.
        """
        line = (json.dumps(record, allow_nan=True) + "\n").encode("utf-8")
        with self._cond:
            if self._stop or self._fd is None:
                raise RuntimeError(f"journal {self._path} is closed")
            written = 0
            try:
                while written < len(line):
                    written += os.write(self._fd, line[written:])
            except OSError:
                if written:  # a partial line would glue onto the next record: cut it off
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._size)
                raise
            self._size += len(line)
            self._records.append(record)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every appended record to be dealt with; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._sent < len(self._records) and self._thread.is_alive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return self._sent >= len(self._records)
            finally:
                self._flushing -= 1

    def close(self, timeout: float) -> bool:
        """Drain for up to ``timeout`` seconds, then stop the sender; True when no record is left pending.

        Undelivered records stay in the journal for a later :func:`segmentation.mlops.runs.sync_journal`; records
        set aside are counted in :attr:`rejected` and :attr:`quarantined`, sender failures in :attr:`failure`.
        """
        drained = self.drain(timeout)
        with self._cond:
            self._stop = True
            self._stopping.set()
            self._cond.notify_all()
        self._thread.join(timeout=1.0)  # it may be inside a slow request; it is a daemon and holds no lock then
        with self._cond:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return drained
