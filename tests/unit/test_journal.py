"""The tracking journal: order, retries through an outage, torn lines, damaged and undeliverable records (kept in
quarantine.jsonl while the rest goes through), rejected records, a failed append, a sender that must not die."""

from __future__ import annotations

import errno
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from segmentation.mlops.delivery import check_record, is_transient, superseded
from segmentation.mlops.journal import Journal
from segmentation.mlops.journal_file import CURSOR_FILE, JOURNAL_FILE, QUARANTINE_FILE, REJECTED_FILE, JournalError
from segmentation.mlops.journal_sender import SENDER_NICE


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
        for record in batch:
            if "file" in record:  # like the real image delivery: the file must still be there
                Path(record["file"]).read_bytes()
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


def write_journal(directory: Path, lines: list[bytes]) -> None:
    (directory / JOURNAL_FILE).write_bytes(b"".join(lines))


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def quarantine(directory: Path) -> list[dict]:
    return [json.loads(x) for x in (directory / QUARANTINE_FILE).read_text().splitlines()]


DAMAGE = {
    "invalid UTF-8": (b'{"kind": "metrics", "step": 2, "values": {"l\xff": 1.0}}\n', "invalid UTF-8"),
    "not JSON": (b'{"kind": "metrics", "step": 2,\n', "not valid JSON"),
    "not an object": (b"[1, 2]\n", "not an object"),
    "no kind": (b'{"step": 2}\n', "no 'kind' field"),
    "kind not a string": (b'{"kind": 7}\n', "not a string"),
    "unknown kind": (b'{"kind": "sound", "step": 2}\n', "unknown record kind 'sound'"),
    "metrics without values": (b'{"kind": "metrics", "step": 2, "timestamp": 0}\n', "without its 'values' field"),
    "non-numeric metric": (b'{"kind": "metrics", "step": 2, "timestamp": 0, "values": {"a": "x"}}\n', "expected a"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_line_is_quarantined_the_rest_delivered_and_a_torn_last_line_cut(tmp_path, damage):
    raw, reason = DAMAGE[damage]
    write_journal(
        tmp_path,
        [line(metrics(1, timestamp=0)), raw, line(metrics(3, timestamp=0)), b'{"kind": "metrics", "st'],  # torn tail
    )
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: False, check=check_record)
    assert journal.close(5)
    assert [r["step"] for r in server.received] == [1, 3]  # the line after the damage still goes
    (entry,) = quarantine(tmp_path)
    assert entry["line"] == 2 and reason in entry["error"]
    assert entry["text"].encode("utf-8", "surrogateescape") == raw.rstrip(b"\n")  # kept byte for byte
    assert journal.quarantined == 1 and reason in journal.quarantine_reasons[0]
    assert (tmp_path / JOURNAL_FILE).read_bytes().endswith(line(metrics(3, timestamp=0)))  # only the torn tail cut
    assert (tmp_path / CURSOR_FILE).read_text() == "3"

    reopened = Journal(tmp_path, server.send, lambda e: False, check=check_record)  # a later sync
    reopened.append(metrics(4))
    assert reopened.close(5) and reopened.quarantined == 1 and len(quarantine(tmp_path)) == 1  # not again
    assert [r["step"] for r in server.received] == [1, 3, 4]


def test_a_missing_local_file_is_quarantined_and_the_records_behind_it_go_through(tmp_path):
    server = FlakyServer()
    server.down = True  # an outage first: that one is retried
    journal = Journal(tmp_path, server.send, is_transient, max_backoff_s=0.05)
    journal.append({"kind": "image", "step": 1, "file": str(tmp_path / "deleted.png")})
    journal.append(metrics(2))
    journal.append({"kind": "end", "status": "FINISHED"})
    assert not journal.drain(0.3) and journal.pending == 3 and journal.quarantined == 0
    server.down = False
    assert journal.close(5)
    assert [r["kind"] for r in server.received] == ["metrics", "end"]  # the final status is not blocked
    (entry,) = quarantine(tmp_path)
    assert entry["line"] == 1 and entry["record"]["step"] == 1 and "deleted.png" in entry["error"]
    assert journal.quarantined == 1 and journal.rejected == 0


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (TimeoutError("timed out"), True),
        (requests.exceptions.ConnectionError("refused"), True),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),  # free some space and it heals
        (MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), False),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "img.png"), False),
        (PermissionError(errno.EACCES, "Permission denied", "img.png"), False),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "img.png"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_network_and_server_errors_are_retried(exc, transient):
    assert is_transient(exc) is transient


def test_an_upload_of_a_folder_pruned_later_is_skipped_not_quarantined(tmp_path):
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, is_transient, superseded=superseded)
    gone = {"kind": "artifacts", "local": str(tmp_path / "step-1"), "path": "checkpoints/step-1"}
    journal.append({**gone, "file": str(tmp_path / "step-1" / "state.json")})  # pruned before its upload
    journal.append({"kind": "delete", "path": "checkpoints/step-1"})
    journal.append({**gone, "path": "checkpoints/step-2", "file": str(tmp_path / "step-2" / "state.json")})
    assert journal.close(5)
    assert [r["kind"] for r in server.received] == ["delete"]
    assert [e["line"] for e in quarantine(tmp_path)] == [3]  # step-2 was deleted by hand: nothing undoes it


def test_a_folder_replaced_or_pruned_during_its_upload_is_not_quarantined(tmp_path):
    """The training replaces a checkpoint folder (rmtree + rename) or prunes it (rmtree, then the delete record)
    while the sender uploads it: the upload fails with a missing file for a moment only."""
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, is_transient, superseded=superseded)
    replaced = {"kind": "artifacts", "local": str(tmp_path), "path": "checkpoints/step-1"}
    journal.append({**replaced, "file": str(tmp_path / "step-1.bin")})  # not there yet
    threading.Timer(0.1, (tmp_path / "step-1.bin").write_bytes, [b"w"]).start()  # back after the "rename"
    assert journal.drain(5) and [r["path"] for r in server.received] == ["checkpoints/step-1"]
    journal.append({**replaced, "path": "checkpoints/step-2", "file": str(tmp_path / "step-2.bin")})
    time.sleep(0.05)
    journal.append({"kind": "delete", "path": "checkpoints/step-2"})  # journaled just after the rmtree
    assert journal.close(5) and [r["kind"] for r in server.received] == ["artifacts", "delete"]
    assert journal.quarantined == 0 and not (tmp_path / QUARANTINE_FILE).exists()


def test_the_sender_survives_a_cursor_it_cannot_save(tmp_path):
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: False)
    (tmp_path / CURSOR_FILE).mkdir()  # saving the cursor (a rename onto it) now fails
    journal.append(metrics(1))
    journal.append(metrics(2))
    assert journal.drain(5) and [r["step"] for r in server.received] == [1, 2]
    assert "delivery cursor" in journal.failure
    (tmp_path / CURSOR_FILE).rmdir()
    journal.append(metrics(3))
    assert journal.close(5) and journal.failure is None  # saved again: a later sync resends nothing
    assert (tmp_path / CURSOR_FILE).read_text() == "3"


def test_the_sender_survives_an_unexpected_exception_and_reports_it(tmp_path):
    calls = []

    def classify(exc: BaseException) -> bool:  # a classifier with a bug on its first call
        calls.append(exc)
        if len(calls) == 1:
            raise KeyError("bug in the classifier")
        return True

    server = FlakyServer()
    server.down = True
    journal = Journal(tmp_path, server.send, classify, max_backoff_s=0.05)
    journal.append(metrics(1))
    assert wait_for(lambda: len(calls) >= 2)  # it went on after the exception
    server.down = False
    journal.append(metrics(2))
    assert journal.close(5) and [r["step"] for r in server.received] == [1, 2]
    assert "bug in the classifier" in journal.failure


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="file size limits are a POSIX feature")
def test_a_failed_append_leaves_no_partial_line_and_the_journal_usable(tmp_path):
    """Simulates a disk that fills up in the middle of a line: RLIMIT_FSIZE lets the write stop part-way and fail
    with EFBIG (an OSError, as ENOSPC is), for this process only, with no root or special filesystem."""
    server = FlakyServer()
    journal = Journal(tmp_path, server.send, lambda e: False)
    journal.append(metrics(1))
    assert journal.drain(5)
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))  # room for 10 bytes of the next line
    try:
        with pytest.raises(OSError) as raised:
            journal.append(metrics(2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.errno == errno.EFBIG
    assert (tmp_path / JOURNAL_FILE).stat().st_size == size  # the 10 bytes written were cut off again
    journal.append(metrics(3))  # room again: the journal goes on
    assert journal.close(5) and [r["step"] for r in server.received] == [1, 3]
    reopened = Journal(tmp_path, server.send, lambda e: False)
    assert [r["step"] for r in reopened.records] == [1, 3] and reopened.pending == 0
    assert reopened.close(1) and not (tmp_path / QUARANTINE_FILE).exists()


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "\xff"])
def test_an_unreadable_cursor_is_a_clear_error(tmp_path, cursor):
    write_journal(tmp_path, [line(metrics(1))])
    (tmp_path / CURSOR_FILE).write_text(cursor, encoding="latin-1")
    with pytest.raises(JournalError, match=r"cursor .*sent holds .*expected the number of journal lines"):
        Journal(tmp_path, FlakyServer().send, lambda e: False)


def test_a_cursor_that_is_not_a_file_is_a_clear_error(tmp_path):
    (tmp_path / CURSOR_FILE).mkdir()
    with pytest.raises(JournalError, match=r"cannot read the tracking journal cursor .*sent"):
        Journal(tmp_path, FlakyServer().send, lambda e: False)
