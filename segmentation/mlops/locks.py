"""Advisory locks kept in an MLflow tag (a run's, a registered model's): owner id, heartbeat, stale timeout.

MLflow has no compare-and-set, so a lock is taken in three moves: read the tag and find it free (absent, or its
holder is gone: a process that no longer exists on this host, or no heartbeat for ``stale_after_s``); write our
owner record; wait ``settle_s`` and read again. We hold the lock only if the tag still names us. The server keeps the
last write, so every contender whose write lands within ``settle_s`` of the others reads back the same owner and
exactly one goes on.

Guarantees and limits:

- Mutual exclusion holds while no contender takes longer than ``settle_s`` between reading "free" and its write
  reaching the server. A process frozen in that window (SIGSTOP, swap) or a request delayed by more than ``settle_s``
  can break it; the heartbeat re-reads the tag and logs an error when it finds another owner.
- A holder that dies on this host frees the lock at once (its pid is gone, or belongs to a younger process). On
  another host a dead holder frees it only after ``stale_after_s`` without a heartbeat; a live holder that cannot
  reach the server for that long (an outage) loses it. Heartbeats compare wall clocks: keep hosts in NTP sync.
- The lock is advisory: only code that takes it is excluded. Deleting the tag by hand frees it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import psutil

logger = logging.getLogger(__name__)

SETTLE_S = 1.0  # longer than a tag write takes on a loaded server (tens of ms here)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: a random id per acquisition, and where it runs (to tell a dead holder on this host)."""

    owner: str
    host: str
    pid: int
    started: float  # the holder process's creation time: a reused pid does not look alive
    heartbeat: float  # time.time() of the last write

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> LockOwner | None:
        """The owner record in a tag value, or None for an absent or unreadable one (treated as free)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                str(data["owner"]),
                str(data["host"]),
                int(data["pid"]),
                float(data["started"]),
                float(data["heartbeat"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, last heartbeat {time.time() - self.heartbeat:.0f} s ago"


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def holder_gone(holder: LockOwner, stale_after_s: float) -> str | None:
    """Why ``holder`` no longer holds its lock (its process is gone, or its heartbeat is stale), else None."""
    age = time.time() - holder.heartbeat
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s (stale after {stale_after_s:.0f} s)"
    if holder.host == socket.gethostname():
        started = _process_started(holder.pid)
        if started is None or abs(started - holder.started) > 1.0:
            return f"process {holder.pid} on this host ({holder.host}) is gone"
    return None


class LockHeldError(RuntimeError):
    """Another live owner holds the lock."""

    def __init__(self, name: str, holder: LockOwner | None) -> None:
        who = holder.describe() if holder else "another owner that took it at the same instant and is done already"
        super().__init__(f"{name} is locked by {who}")
        self.holder = holder


class TagLock:
    """A lock stored in one tag, read, written and deleted through the three callables.

    Args:
        name: what is locked, for messages (``run 1a2b...``).
        read: returns the tag's value (None when absent).
        write: sets the tag.
        delete: removes the tag.
        settle_s, heartbeat_s, stale_after_s: see the module docstring.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], str | None],
        write: Callable[[str], None],
        delete: Callable[[], None],
        settle_s: float = SETTLE_S,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.name, self._read, self._write, self._delete = name, read, write, delete
        self.settle_s, self.heartbeat_s, self.stale_after_s = settle_s, heartbeat_s, stale_after_s
        self.me: LockOwner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> LockOwner:
        pid = os.getpid()
        started = _process_started(pid) or 0.0
        owner = self.me.owner if self.me else uuid.uuid4().hex
        return LockOwner(owner, socket.gethostname(), pid, started, time.time())

    def live_holder(self) -> LockOwner | None:
        """The current holder if it is alive, else None (free)."""
        holder = LockOwner.parse(self._read())
        if holder is None:
            return None
        reason = holder_gone(holder, self.stale_after_s)
        if reason is not None:
            logger.warning("%s: taking over the lock of %s: %s", self.name, holder.describe(), reason)
            return None
        return holder

    def try_acquire(self, settle: bool = True) -> None:
        """Take the lock or raise :class:`LockHeldError` naming the holder.

        ``settle=False`` skips the read-back, for a lock nobody else can know of yet (a run just created).
        """
        holder = self.live_holder() if settle else None
        if holder is not None:
            raise LockHeldError(self.name, holder)
        self.me = self._record()
        try:
            self._write(self.me.to_json())
        except Exception:
            # Writers racing to create the tag collide in the store (a unique-constraint error, sqlite and
            # PostgreSQL alike): one insert won. Anything else (the server is down) is raised as it is.
            self.me, holder = None, LockOwner.parse(self._read())
            if holder is None:
                raise
            raise LockHeldError(self.name, holder) from None
        if settle:
            time.sleep(self.settle_s)
            holder = LockOwner.parse(self._read())
            if holder is None or holder.owner != self.me.owner:
                self.me = None
                raise LockHeldError(self.name, holder)  # the last writer of the race (None: it released already)
        self._start_heartbeat()

    def acquire(self, timeout: float, poll_s: float = 0.5) -> None:
        """Wait up to ``timeout`` s for the lock.

        Raises:
            TimeoutError: still held by another owner (named) after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.try_acquire()
                return
            except LockHeldError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{exc} after waiting {timeout:.0f} s") from None
            time.sleep(poll_s * (0.5 + random.random()))  # jitter: contenders do not retry in lockstep

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = LockOwner.parse(self._read())
                if holder is None or holder.owner != self.me.owner:
                    logger.error("%s: the lock was taken over by %s", self.name, holder and holder.describe())
                    return
                self.me = self._record()
                self._write(self.me.to_json())
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not stop the holder
                logger.warning("%s: lock heartbeat not written: %s", self.name, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the tag if it still names us (never raises: the work is done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.me is None:
            return
        try:
            holder = LockOwner.parse(self._read())
            if holder is not None and holder.owner == self.me.owner:
                self._delete()
        except Exception as exc:  # noqa: BLE001 - left behind, it frees itself (dead process or stale heartbeat)
            logger.warning("%s: lock not released (%s); it frees itself once this process is gone", self.name, exc)
        self.me = None
