"""A durable, ordered journal of tracking writes, sent to the tracking server by one background thread.

Training appends each write (a batch of metrics, an image, a checkpoint folder to upload...) as one JSON line to
``<directory>/journal.jsonl`` and goes on at once; a sender thread delivers the records in order and moves a cursor
(``<directory>/sent``, the number of lines dealt with) past each one. While the server is unreachable the sender keeps
retrying with a capped backoff, so an outage only delays the records; if it outlasts the run, the journal stays on
disk and ``python -m entrypoints.sync_tracking <directory>`` delivers the rest later.

Metric records are coalesced: the sender starts a metrics request at most once every ``min_interval_s`` and sends
everything queued by then as one batch, so a training that logs every step costs the server (and the CPU it shares
with training) one request per interval instead of one per step. Images, uploads and the final status are sent as
soon as they are queued; :meth:`Journal.drain` and :meth:`Journal.close` flush without waiting.

Guarantees: a process killed at any point (``kill -9``) loses nothing already appended (every line reaches the OS
before ``append`` returns; a half-written LAST line, which has no newline, is cut off on reopen). A failed append
(disk full) raises and leaves the file as it was. A record delivered but not yet acknowledged in ``sent`` when the
process dies is delivered again: metric batches are idempotent on the server, an image would appear twice.

Nothing blocks the records behind it. Failures the ``is_transient`` callback names (server down, 5xx) are retried;
a record the server refuses for good goes to ``rejected.jsonl``; a record that cannot be sent from here goes to
``quarantine.jsonl`` with its line number and the reason: a complete line that is not a record (invalid UTF-8 or
JSON, not an object, no ``kind``, or refused by the ``check`` callback), or a local error (:class:`DamagedRecord`,
or an ``OSError`` such as a file it names being gone, once two more tries a moment apart failed too). Both files
keep the record; the journal itself is never rewritten. :attr:`Journal.rejected` and :attr:`Journal.quarantined`
count every record these files hold.

Reading the file back is :mod:`segmentation.mlops.journal_file`. This module knows nothing about MLflow:
:mod:`segmentation.mlops.delivery` provides ``send``, ``is_transient``, ``check`` and ``superseded``.
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
from segmentation.mlops.journal_file import (
    DamagedLine,
    DamagedRecord,
    JournalError,
    count_lines,
    read_cursor,
    read_journal,
)

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
CURSOR_FILE = "sent"
REJECTED_FILE = "rejected.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
SENDER_NICE = 10  # how much nicer than training the sender thread runs (Linux): training's threads come first
LOCAL_RETRY_WAITS = (0.2, 1.0)  # seconds before each new attempt after a local file error, then it is quarantined


def _kind(entry: dict | DamagedLine) -> str | None:
    return entry.get("kind") if isinstance(entry, dict) else None


def lower_thread_priority(increment: int = SENDER_NICE) -> None:
    """Make the calling thread yield the CPU to the process's other threads (Linux; a no-op elsewhere).

    On Linux ``setpriority(PRIO_PROCESS, tid)`` applies to one thread: training's compute threads keep their
    priority while background delivery takes the CPU time they leave (niceness + ``increment``, at most 19).
    """
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))


class Journal:
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
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._send, self._is_transient, self._superseded = send, is_transient, superseded
        self._max_backoff, self._min_interval = max_backoff_s, min_interval_s
        self._flushing = 0  # callers inside drain(): send what is queued without waiting for the interval
        self._path = self.directory / JOURNAL_FILE
        self._records, self._size = read_journal(self._path, check)
        self._sent = read_cursor(self.directory / CURSOR_FILE, len(self._records))
        try:
            self._fd: int | None = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open tracking journal {self._path} for writing: {exc}") from None
        self._cond = threading.Condition()
        self._stop = False
        self._stopping = threading.Event()  # cuts a retry wait short at close (appends do not)
        self.failing_since: float | None = None  # wall time of the first failed attempt of the current outage
        self.last_error: str | None = None
        self.rejected = count_lines(self.directory / REJECTED_FILE)  # records the server refused for good
        self.quarantined = count_lines(self.directory / QUARANTINE_FILE)  # records that cannot be sent from here
        self.quarantine_reasons: list[str] = []  # this session's, e.g. "line 7 (image): [Errno 2] ..."
        self.sender_error: str | None = None  # the first unexpected failure of the sender thread
        self.cursor_error: str | None = None  # set while the cursor on disk lags behind (a later sync resends)
        self._backoff = self._initial_backoff = min(0.5, max_backoff_s)
        self._local_failures = 0  # local file errors of the record in hand, tried again up to LOCAL_RETRY_WAITS
        self._not_before = 0.0
        self._thread = threading.Thread(target=self._run, name="tracking-journal", daemon=True)
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

    @property
    def failure(self) -> str | None:
        """A failure of the sender itself (not of a delivery) that a caller should report, else None."""
        return self.sender_error or self.cursor_error

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

    def _next_batch(self) -> list[dict]:
        """The next record, or the run of consecutive metric records that fits in one request."""
        first = self._records[self._sent]
        if _kind(first) != "metrics":
            return [first]
        batch, count = [], 0
        for record in self._records[self._sent :]:
            size = len(record.get("values") or ()) if _kind(record) == "metrics" else 0
            if _kind(record) != "metrics" or (batch and count + size > MAX_METRICS_PER_BATCH):
                break
            batch.append(record)
            count += size
        return batch

    def _wait_to_coalesce(self) -> None:
        """Hold a metrics request until ``_not_before`` (monotonic) so that later metric records join it.

        Called with the lock held; returns early when a non-metric record is queued, on drain or on close.
        """
        while not (self._stop or self._flushing):
            remaining = self._not_before - time.monotonic()
            if remaining <= 0 or any(_kind(r) != "metrics" for r in self._records[self._sent :]):
                return
            self._cond.wait(remaining)

    def _run(self) -> None:
        lower_thread_priority()
        while True:
            try:
                if not self._deliver_next():
                    return
            except Exception as exc:  # noqa: BLE001 - a bug here must not end delivery silently
                logger.exception("tracking journal %s: the sender failed; it goes on", self._path)
                self.sender_error = self.sender_error or f"{type(exc).__name__}: {exc}"
                self._retry_wait()

    def _deliver_next(self) -> bool:
        """Deliver, set aside or retry the next record(s); False once the journal is closed."""
        with self._cond:
            while self._sent >= len(self._records) and not self._stop:
                self._cond.wait()
            if self._stop:
                return False
            first = self._records[self._sent]
            if isinstance(first, DamagedLine):
                entry = {"line": first.line, "error": first.reason, "text": first.text}
                self._set_aside(QUARANTINE_FILE, [entry], f"line {first.line}: {first.reason}")
                self._advance(1)
                return True
            if first["kind"] == "metrics":
                self._wait_to_coalesce()
                if self._stop:
                    return False
            start, batch = self._sent, self._next_batch()
        self._not_before = time.monotonic() + self._min_interval
        try:
            self._send(batch)
        except Exception as exc:  # noqa: BLE001 - classified below
            if self._is_transient(exc):
                if self.failing_since is None:
                    self.failing_since = time.time()
                    logger.warning("tracking server unreachable, records kept in %s and retried: %s", self._path, exc)
                self.last_error = str(exc)
                self._retry_wait()
                return True
            if not self._give_up(batch, start, exc):
                return True  # tried again
        if self.failing_since is not None:
            logger.warning(
                "tracking server reachable again after %.0f s; sending the backlog", time.time() - self.failing_since
            )
        self.failing_since, self.last_error, self._backoff = None, None, self._initial_backoff
        self._local_failures = 0
        with self._cond:
            self._advance(len(batch))
        return True

    def _give_up(self, batch: list[dict], start: int, exc: Exception) -> bool:
        """Set aside records that failed for good: quarantined for a local cause, else rejected by the server.

        A local file error may be the middle of a change the training is making (a checkpoint folder being pruned or
        replaced): it is tried again after :data:`LOCAL_RETRY_WAITS` before the record is quarantined, and skipped
        when a record appended meanwhile undoes it. Returns False when the record is to be tried again.
        """
        local = isinstance(exc, (OSError, DamagedRecord))
        with self._cond:
            later = [r for r in self._records[start + len(batch) :] if isinstance(r, dict)]
        if local and self._superseded is not None and self._superseded(batch[0], later):
            logger.info("journal line %d (%s) skipped: %s; a later record undoes it", start + 1, batch[0]["kind"], exc)
            return True
        if isinstance(exc, OSError) and self._local_failures < len(LOCAL_RETRY_WAITS):
            self._stopping.wait(LOCAL_RETRY_WAITS[self._local_failures])
            self._local_failures += 1
            return False
        self._local_failures = 0
        entries = [{"line": start + i + 1, "error": str(exc), "record": r} for i, r in enumerate(batch)]
        where = f"line {start + 1}" if len(batch) == 1 else f"lines {start + 1}-{start + len(batch)}"
        with self._cond:
            self._set_aside(
                QUARANTINE_FILE if local else REJECTED_FILE, entries, f"{where} ({batch[0]['kind']}): {exc}"
            )
        return True

    def _set_aside(self, name: str, entries: list[dict], reason: str) -> None:
        """Keep records that will not be delivered in side file ``name``, counted and logged (lock held)."""
        if name == QUARANTINE_FILE:
            self.quarantined += len(entries)
            self.quarantine_reasons.append(reason)
        else:
            self.rejected += len(entries)
        logger.error("tracking journal %s: %s; kept in %s, not delivered", self._path, reason, name)
        try:
            with (self.directory / name).open("a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(entry, allow_nan=True) + "\n" for entry in entries))
        except OSError as exc:  # the record stays in the journal itself
            logger.error("could not write %s: %s", self.directory / name, exc)
            self.sender_error = self.sender_error or f"could not write {self.directory / name}: {exc}"

    def _advance(self, count: int) -> None:
        """Move the cursor past ``count`` lines and save it (lock held); a failed save is reported, not fatal."""
        self._sent += count
        try:
            write_text_atomic(self.directory / CURSOR_FILE, str(self._sent))
            self.cursor_error = None
        except OSError as exc:
            if self.cursor_error is None:
                logger.error("could not save the tracking journal cursor (a later sync would resend): %s", exc)
            self.cursor_error = f"could not save the delivery cursor {self.directory / CURSOR_FILE}: {exc}"
        self._cond.notify_all()

    def _retry_wait(self) -> None:
        self._stopping.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)
