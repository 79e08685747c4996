"""The tracking journal: order, retries through an outage, torn lines, rejected records, reopening."""

from __future__ import annotations

from segmentation.spool import CURSOR_FILE, JOURNAL_FILE, REJECTED_FILE, Journal


class FlakyServer:
    """Accepts records unless ``down``; a record with ``bad`` is refused for good."""

    def __init__(self) -> None:
        self.down, self.received, self.attempts = False, [], 0

    def send(self, batch: list[dict]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("connection refused")
        if any(r.get("bad") for r in batch):
            raise ValueError("invalid metric")
        self.received.extend(batch)


def metrics(step: int, **extra) -> dict:
    return {"kind": "metrics", "step": step, "values": {"loss": float(step)}, **extra}


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
