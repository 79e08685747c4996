"""The tracking journal: order, retries through an outage, torn lines, rejected records, reopening."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from segmentation.mlops.journal import CURSOR_FILE, JOURNAL_FILE, REJECTED_FILE, SENDER_NICE, Journal


class FlakyServer:
    """Accepts records unless ``down``; a record with ``bad`` is refused for good."""

    def __init__(self) -> None:
        self.down, self.received, self.attempts, self.batches = False, [], 0, []

    def send(self, batch: list[dict]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        if any(r.get("bad") for r in batch):
            raise ValueError("invalid metric")
        self.received.extend(batch)
        self.batches.append([r.get("step") for r in batch])


def metrics(step: int, **extra) -> dict:
    return {"kind": "metrics", "step": step, "values": {"loss": float(step)}, **extra}


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_metrics_are_coalesced_and_other_records_and_close_do_not_wait(tmp_path):
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: False, min_interval_s=60)
    journal.append(metrics(1))
    assert wait_for(lambda: server.attempts == 1)  # nothing was sent before: the first record goes at once
    for step in range(2, 6):
        journal.append(metrics(step))
    time.sleep(0.3)
    assert server.attempts == 1 and journal.pending == 4  # held back for the interval, to travel together
    journal.append({"kind": "image", "step": 6})  # an image does not wait, and takes the metrics before it along
    assert wait_for(lambda: journal.pending == 0)
    journal.append(metrics(7))
    assert journal.close(5)  # closing flushes at once instead of waiting out the 60 s
    assert server.batches == [[1], [2, 3, 4, 5], [6], [7]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux behaviour")
def test_sender_thread_runs_at_a_lower_priority_than_training(tmp_path):
    journal = Journal(tmp_path, lambda batch: None, lambda e: False)
    try:
        assert wait_for(lambda: journal._thread.native_id is not None)
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert wait_for(
            lambda: os.getpriority(os.PRIO_PROCESS, journal._thread.native_id) == min(19, ours + SENDER_NICE)
        )
    finally:
        journal.close(1)


def test_outage_delays_but_keeps_order_and_everything(tmp_path):
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: isinstance(e, ConnectionError), max_backoff_s=0.05)
    server.down = True
    for step in range(1, 6):
        journal.append(metrics(step))
    assert not journal.drain(0.3) and journal.pending == 5 and server.attempts >= 2
    server.down = False
    assert journal.close(5)
    assert [r["step"] for r in server.received] == [1, 2, 3, 4, 5]
    assert (tmp_path / CURSOR_FILE).read_text() == "5"


def test_rejected_record_does_not_block_the_rest(tmp_path):
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: isinstance(e, ConnectionError))
    journal.append({"kind": "image", "bad": True})
    journal.append(metrics(2))
    assert journal.close(5) and journal.rejected == 1
    assert [r["step"] for r in server.received] == [2]
    assert "invalid metric" in (tmp_path / REJECTED_FILE).read_text()


def test_reopen_cuts_a_torn_line_and_sends_only_the_backlog(tmp_path):
    server = FlakyServer()
    server.down = True
    journal = Journal(tmp_path, server.send, lambda e: True, max_backoff_s=0.05)
    journal.append(metrics(1))
    journal.append(metrics(2))
    assert not journal.close(0.1)
    with (tmp_path / JOURNAL_FILE).open("a") as fh:
        fh.write('{"kind": "metrics", "st')  # killed in the middle of a write
    (tmp_path / CURSOR_FILE).write_text("1")  # step 1 had been delivered before the kill
    server.down = False
    reopened = Journal(tmp_path, server.send, lambda e: True)
    assert [r["step"] for r in reopened.records] == [1, 2]
    reopened.append(metrics(3))
    assert reopened.close(5)
    assert [r["step"] for r in server.received] == [2, 3]
    assert (tmp_path / JOURNAL_FILE).read_text().count("\n") == 3
