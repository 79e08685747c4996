"""A durable, ordered journal of tracking writes, sent to the tracking server by one background thread.

Training appends each write (a batch of metrics, an image, a checkpoint folder to upload...) as one JSON line to
``<directory>/journal.jsonl`` and goes on at once; a sender thread delivers the records in order and moves a cursor
(``<directory>/sent``) past each delivered one. While the server is unreachable the sender keeps retrying with a
capped backoff, so an outage only delays the records; if it outlasts the run, the journal stays on disk and
``python -m entrypoints.sync_tracking <directory>`` delivers the rest later.

Guarantees: a process killed at any point (``kill -9``) loses nothing already appended (every line is flushed to
the OS before ``append`` returns; a half-written last line is cut off on reopen). A record delivered but not yet
acknowledged in ``sent`` when the process dies is delivered again: metric batches are idempotent on the server
(same key, step, value and timestamp), an image would appear twice. Records the server rejects for good (e.g. a
deleted run) are moved to ``rejected.jsonl`` with the reason instead of blocking the ones behind them.

This module knows nothing about MLflow: :mod:`segmentation.tracking` provides ``send`` and ``is_transient``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from segmentation.io import write_text_atomic

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
CURSOR_FILE = "sent"
REJECTED_FILE = "rejected.jsonl"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def _read_records(path: Path) -> list[dict]:
    """The complete lines of a journal; a torn last line (process killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    records = []
    for line in good.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # cannot happen for flushed lines; stop at the first damaged one rather than skip it
    if len(good) != len(data):
        with path.open("r+b") as fh:
            fh.truncate(len(good))
    return records


class Journal:
    """Append-only tracking journal with an in-order background sender.

    Args:
        directory: where ``journal.jsonl``, ``sent`` and ``rejected.jsonl`` live (created if missing).
        send: delivers a list of consecutive records (one record, or several ``metrics`` records to batch);
            raises on failure.
        is_transient: whether a failure of ``send`` is worth retrying (server down, 5xx) rather than final.
        max_backoff_s: longest wait between two attempts while the server is unreachable.
    """

    def __init__(self, directory: str | Path, send: Callable[[list[dict]], None],
                 is_transient: Callable[[BaseException], bool], max_backoff_s: float = 5.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._send, self._is_transient, self._max_backoff = send, is_transient, max_backoff_s
        self._path = self.directory / JOURNAL_FILE
        self._records = _read_records(self._path)
        cursor = self.directory / CURSOR_FILE
        self._sent = min(int(cursor.read_text() or 0), len(self._records)) if cursor.is_file() else 0
        self._file = self._path.open("a", encoding="utf-8")
        self._cond = threading.Condition()
        self._stop = False
        self._stopping = threading.Event()  # cuts a retry wait short at close (appends do not)
        self.failing_since: float | None = None  # wall time of the first failed attempt of the current outage
        self.last_error: str | None = None
        self.rejected = 0  # records the server refused for good during this session
        self._thread = threading.Thread(target=self._run, name="tracking-journal", daemon=True)
        self._thread.start()

    @property
    def records(self) -> list[dict]:
        """Every record ever appended (delivered or not), oldest first."""
        with self._cond:
            return list(self._records)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._records) - self._sent

    def append(self, record: dict) -> None:
        """Persist ``record`` (JSON-serialisable) and queue it for delivery; never blocks on the network."""
        line = json.dumps(record, allow_nan=True) + "\n"
        with self._cond:
            if self._stop:
                raise RuntimeError(f"journal {self._path} is closed")
            self._file.write(line)
            self._file.flush()
            self._records.append(record)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every appended record to be delivered; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._sent < len(self._records) and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._sent >= len(self._records)

    def close(self, timeout: float) -> bool:
        """Drain for up to ``timeout`` seconds, then stop the sender; True when everything was delivered.

        Undelivered records stay in the journal for a later :func:`segmentation.tracking.sync_journal`.
        """
        drained = self.drain(timeout)
        with self._cond:
            self._stop = True
            self._stopping.set()
            self._cond.notify_all()
        self._thread.join(timeout=1.0)  # it may be inside a slow request; it is a daemon and holds no lock then
        self._file.close()
        return drained

    def _next_batch(self) -> list[dict]:
        """The next record, or the run of consecutive metric records that fits in one request."""
        first = self._records[self._sent]
        if first.get("kind") != "metrics":
            return [first]
        batch, count = [], 0
        for record in self._records[self._sent:]:
            if record.get("kind") != "metrics" or (batch and count + len(record["values"]) > MAX_METRICS_PER_BATCH):
                break
            batch.append(record)
            count += len(record["values"])
        return batch

    def _run(self) -> None:
        backoff = initial = min(0.5, self._max_backoff)
        while True:
            with self._cond:
                while self._sent >= len(self._records) and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch = self._next_batch()
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - classified below; the sender must survive anything
                if self._is_transient(exc):
                    if self.failing_since is None:
                        self.failing_since = time.time()
                        logger.warning("tracking server unreachable, records kept in %s and retried: %s",
                                       self._path, exc)
                    self.last_error = str(exc)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                self.rejected += len(batch)
                logger.error("tracking server rejected %s record(s) (kept in %s): %s", len(batch),
                             REJECTED_FILE, exc)
                with (self.directory / REJECTED_FILE).open("a", encoding="utf-8") as fh:
                    for record in batch:
                        fh.write(json.dumps({"error": str(exc), "record": record}) + "\n")
            if self.failing_since is not None:
                logger.warning("tracking server reachable again after %.0f s; sending the backlog",
                               time.time() - self.failing_since)
            self.failing_since, self.last_error, backoff = None, None, initial
            with self._cond:
                self._sent += len(batch)
                write_text_atomic(self.directory / CURSOR_FILE, str(self._sent))
                self._cond.notify_all()
