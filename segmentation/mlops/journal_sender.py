"""The sender thread behind a :class:`~segmentation.mlops.journal.Journal`: it delivers the records in order and
moves the cursor (``<directory>/sent``, the number of lines dealt with) past each one.

Metric records are coalesced: the sender starts a metrics request at most once every ``min_interval_s`` and sends
everything queued by then as one batch, so a training that logs every step costs the server (and the CPU it shares
with training) one request per interval instead of one per step. Images, uploads and the final status are sent as
soon as they are queued. The thread runs at a lower priority than training's (:func:`lower_thread_priority`).

Nothing blocks the records behind it. Failures the ``is_transient`` callback names (server down, 5xx) are retried
with a capped backoff; a record the server refuses for good goes to ``rejected.jsonl``; a record that cannot be sent
from here goes to ``quarantine.jsonl`` with its line number and the reason: a complete line that is not a record
(:class:`~segmentation.mlops.journal_file.DamagedLine`), or a local error (:class:`DamagedRecord`, or an ``OSError``
such as a file it names being gone, once two more tries a moment apart failed too). Both files keep the record; the
journal itself is never rewritten.
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
    CURSOR_FILE,
    JOURNAL_FILE,
    QUARANTINE_FILE,
    REJECTED_FILE,
    DamagedLine,
    DamagedRecord,
    count_lines,
)

logger = logging.getLogger(__name__)

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


class JournalSender:
    """Delivers ``records[sent:]`` in order from a thread of its own, created here and started by
    :class:`~segmentation.mlops.journal.Journal` once its file is open; the journal appends to ``records`` under
    the same lock (``_cond``).

    Args:
        directory: the journal folder.
        records: the journal's lines read back (records, or damaged lines that keep their place).
        sent: the cursor read back: how many of ``records`` were dealt with.
        send, is_transient, max_backoff_s, min_interval_s, superseded: as for
            :class:`~segmentation.mlops.journal.Journal`.
    """

    def __init__(
        self,
        directory: Path,
        records: list[dict | DamagedLine],
        sent: int,
        send: Callable[[list[dict]], None],
        is_transient: Callable[[BaseException], bool],
        max_backoff_s: float,
        min_interval_s: float,
        superseded: Callable[[dict, list[dict]], bool] | None,
    ) -> None:
        self.directory = directory
        self._path = directory / JOURNAL_FILE
        self._records, self._sent = records, sent
        self._send, self._is_transient, self._superseded = send, is_transient, superseded
        self._max_backoff, self._min_interval = max_backoff_s, min_interval_s
        self._flushing = 0  # callers inside drain(): send what is queued without waiting for the interval
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

    @property
    def failure(self) -> str | None:
        """A failure of the sender itself (not of a delivery) that a caller should report, else None."""
        return self.sender_error or self.cursor_error

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
