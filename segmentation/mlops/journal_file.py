"""The journal folder on disk: the names of its files, reading ``journal.jsonl`` back line by line, the delivery
cursor ``sent``, the side files' counts and ``run.json``.

A torn last line (no newline: the process was killed mid-write) is cut off; a complete line that holds no record
(invalid UTF-8 or JSON, not an object, no string ``kind``, or refused by a ``check``) becomes a :class:`DamagedLine`
that keeps its place, so that line numbers and the cursor stay true and the sender can quarantine it in turn.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

JOURNAL_FILE = "journal.jsonl"  # one record (a JSON object) a line, in the order they were appended
CURSOR_FILE = "sent"  # how many journal lines were dealt with (delivered or set aside)
REJECTED_FILE = "rejected.jsonl"  # records the server refused for good
QUARANTINE_FILE = "quarantine.jsonl"  # records that cannot be sent from here (damaged, local file gone)
META_FILE = "run.json"  # {"run_id": ..., "tracking_uri": ...}: where the journal's records go


class JournalError(ValueError):
    """The journal folder cannot be used as it is (its journal or cursor is unreadable); the message says why."""


class DamagedRecord(ValueError):
    """A record that can never be delivered as it is (an unknown kind, a missing or mistyped field)."""


@dataclass(frozen=True)
class DamagedLine:
    """A complete journal line that is not a usable record; it keeps its place so that the cursor stays true."""

    line: int  # 1-based line number in journal.jsonl
    reason: str
    text: str  # the line; bytes that are not UTF-8 as surrogate escapes (JSON writes them as \udcXX)


def _parse_line(raw: bytes, check: Callable[[dict], None] | None) -> dict | str:
    """The record on one journal line, or why it is not one."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("kind"), str):
        return "no 'kind' field" if "kind" not in record else f"'kind' is {record['kind']!r}, not a string"
    if check is not None:
        try:
            check(record)
        except DamagedRecord as exc:
            return str(exc)
    return record


def read_journal(path: Path, check: Callable[[dict], None] | None) -> tuple[list[dict | DamagedLine], int]:
    """The journal's lines as records (or :class:`DamagedLine`) and its size in bytes once a torn tail is cut off.

    A last line without its newline is a write the process did not finish (killed mid-write): it is cut off the file.
    A complete line that does not hold a record is damage: it keeps its place, to be quarantined in turn.
    """
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise JournalError(f"cannot read tracking journal {path}: {exc}") from None
    end = data.rfind(b"\n") + 1
    entries: list[dict | DamagedLine] = []
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        parsed = _parse_line(raw, check)
        entries.append(
            parsed if isinstance(parsed, dict) else DamagedLine(number, parsed, raw.decode("utf-8", "surrogateescape"))
        )
    if end != len(data):
        try:
            with path.open("r+b") as fh:
                fh.truncate(end)
        except OSError as exc:
            raise JournalError(f"cannot cut the torn last line off tracking journal {path}: {exc}") from None
    return entries, end


def read_cursor(path: Path, total: int) -> int:
    """How many journal lines were dealt with (0 without a cursor file)."""
    if not path.exists():
        return 0
    try:
        text = path.read_bytes().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise JournalError(f"cannot read the tracking journal cursor {path}: {exc}") from None
    if text and not (text.isascii() and text.isdigit()):
        raise JournalError(
            f"tracking journal cursor {path} holds {text[:40]!r}; expected the number of journal lines already "
            f"delivered, an integer from 0 to {total}. Write the right number into it (0 sends everything again: "
            f"metrics are not duplicated, but images and the model would be logged twice)"
        )
    return min(int(text or 0), total)


def count_lines(path: Path) -> int:
    """Non-empty lines of a side file (``rejected.jsonl``, ``quarantine.jsonl``); 0 when it cannot be read."""
    with contextlib.suppress(OSError):
        return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    return 0


def read_run_meta(directory: Path) -> dict[str, str]:
    """``run.json`` of a journal folder: the run id and the tracking URI the training used (it writes the file).

    Raises:
        JournalError: the file is unreadable, not a JSON object, or lacks ``run_id`` or ``tracking_uri``.
    """
    path = directory / META_FILE
    fix = (
        'it should hold {"run_id": "<id>", "tracking_uri": "<uri>"} (the run id is the name of the training\'s '
        "output folder, the one above this folder); rewrite it so"
    )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise JournalError(f"{path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise JournalError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise JournalError(f"{path} holds a JSON {type(meta).__name__}, not an object; {fix}")
    for key in ("run_id", "tracking_uri"):
        if key not in meta:
            raise JournalError(f"{path} has no {key!r}; {fix}")
        if not isinstance(meta[key], str) or not meta[key]:
            raise JournalError(f"{path}: {key!r} is {meta[key]!r}, expected a non-empty string; {fix}")
    return meta
