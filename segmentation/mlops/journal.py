"""A durable, ordered journal of tracking writes, sent to the tracking server by one background thread.

Training appends each write (a batch of metrics, an image, a checkpoint folder to upload...) as one JSON line to
``<directory>/journal.jsonl`` and goes on at once; a sender thread delivers the records in order and moves a cursor
(``<directory>/sent``) past each delivered one. While the server is unreachable the sender keeps retrying with a
capped backoff, so an outage only delays the records; if it outlasts the run, the journal stays on disk and
``python -m entrypoints.sync_tracking <directory>`` delivers the rest later.

Metric records are coalesced: the sender starts a metrics request at most once every ``min_interval_s`` and sends
everything queued by then as one batch, so a training that logs every step costs the server (and the CPU it shares
with training) one request per interval instead of one per step. Images, uploads and the final status are sent as
soon as they are queued; :meth:`Journal.drain` and :meth:`Journal.close` flush without waiting.

Guarantees: a process killed at any point (``kill -9``) loses nothing already appended (every line is flushed to
the OS before ``append`` returns; a half-written last line is cut off on reopen). A record delivered but not yet
acknowledged in ``sent`` when the process dies is delivered again: metric batches are idempotent on the server
(same key, step, value and timestamp), an image would appear twice. Records the server rejects for good (e.g. a
deleted run) are moved to ``rejected.jsonl`` with the reason instead of blocking the ones behind them.

This module knows nothing about MLflow: :mod:`segmentation.mlops.tracker` provides ``send`` and ``is_transient``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
SENDER_NICE = 10  # how much nicer than training the sender thread runs (Linux): training's threads come first


def lower_thread_priority(increment: int = SENDER_NICE) -> None:
    """Make the calling thread yield the CPU to the process's other threads (Linux; a no-op elsewhere).

    On Linux ``setpriority(PRIO_PROCESS, tid)`` applies to one thread: training's compute threads keep their
    priority while background delivery takes the CPU time they leave (niceness + ``increment``, at most 19).
    """
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))


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
        min_interval_s: shortest time between the start of a request and the next metrics request; metric records
            queued meanwhile go out together. 0 sends each one as soon as the previous request is done.
    """

    def __init__(
        self,
        directory: str | Path,
        send: Callable[[list[dict]], None],
        is_transient: Callable[[BaseException], bool],
        max_backoff_s: float = 5.0,
        min_interval_s: float = 0.0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._send, self._is_transient, self._max_backoff = send, is_transient, max_backoff_s
        self._min_interval = min_interval_s
        self._flushing = 0  # callers inside drain(): send what is queued without waiting for the interval
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
        for record in self._records[self._sent :]:
            if record.get("kind") != "metrics" or (batch and count + len(record["values"]) > MAX_METRICS_PER_BATCH):
                break
            batch.append(record)
            count += len(record["values"])
        return batch

    def _wait_to_coalesce(self, not_before: float) -> None:
        """Hold a metrics request until ``not_before`` (monotonic) so that later metric records join it.

        Called with the lock held; returns early when a non-metric record is queued, on drain or on close.
        """
        while not (self._stop or self._flushing):
            remaining = not_before - time.monotonic()
            if remaining <= 0 or any(r.get("kind") != "metrics" for r in self._records[self._sent :]):
                return
            self._cond.wait(remaining)

    def _run(self) -> None:
        lower_thread_priority()
        backoff = initial = min(0.5, self._max_backoff)
        not_before = 0.0
        while True:
            with self._cond:
                while self._sent >= len(self._records) and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                if self._records[self._sent].get("kind") == "metrics":
                    self._wait_to_coalesce(not_before)
                    if self._stop:
                        return
                batch = self._next_batch()
            not_before = time.monotonic() + self._min_interval
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - classified below; the sender must survive anything
                if self._is_transient(exc):
                    if self.failing_since is None:
                        self.failing_since = time.time()
                        logger.warning(
                            "tracking server unreachable, records kept in %s and retried: %s", self._path, exc
                        )
                    self.last_error = str(exc)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                self.rejected += len(batch)
                logger.error("tracking server rejected %s record(s) (kept in %s): %s", len(batch), REJECTED_FILE, exc)
                with (self.directory / REJECTED_FILE).open("a", encoding="utf-8") as fh:
                    for record in batch:
                        fh.write(json.dumps({"error": str(exc), "record": record}) + "\n")
            if self.failing_since is not None:
                logger.warning(
                    "tracking server reachable again after %.0f s; sending the backlog",
                    time.time() - self.failing_since,
                )
            self.failing_since, self.last_error, backoff = None, None, initial
            with self._cond:
                self._sent += len(batch)
                write_text_atomic(self.directory / CURSOR_FILE, str(self._sent))
                self._cond.notify_all()
