"""Exit codes that cross a launcher: a child process records the code it exits with, its parent reads it.

``mlflow run`` (the pipeline's steps) and ``accelerate launch`` (the ranks of a training) report any failure of
what they start as exit code 1; the entry points' table (``entrypoints/_cli.py``) tells bad input (2) and an
incomplete tracking record (3) apart. A parent sets :data:`EXIT_CODE_DIR_ENV` to a folder for its children
(:func:`collect_exit_codes`), every entry point writes its code there when it ends (:func:`record_exit_code`), and
the parent exits with theirs (:func:`children_exit_code`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_CODE_DIR_ENV = "SEGMENTATION_EXIT_CODE_DIR"
UNEXPECTED = 1


def record_exit_code(code: int) -> None:
    """Write ``code`` into the parent's folder, when a parent asked for it (one file per process)."""
    folder = os.environ.get(EXIT_CODE_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return
    path = Path(folder) / f"{os.getpid()}.code"
    partial = path.with_suffix(".partial")
    try:
        partial.write_text(str(code))
        partial.replace(path)  # a parent never reads half a number
    except OSError:  # the parent is gone or stopped waiting: the code is only a message to it
        pass


def children_exit_code(folder: str | Path, launcher_code: int) -> int:
    """The exit code for a parent whose launcher exited with ``launcher_code``: the code the failed children
    recorded when they agree on one; when they do not, the one other than 1 (ranks whose peer stopped on bad input
    fail with a broken connection, 1, as a consequence), else 1; ``launcher_code`` when none recorded a failure (a
    child killed by a signal, or a launcher that failed by itself)."""
    if launcher_code == 0:
        return 0
    failed = set()
    for path in Path(folder).glob("*.code"):
        text = path.read_text().strip()
        code = int(text) if text.isdigit() else UNEXPECTED
        if code != 0:
            failed.add(code)
    if not failed:
        return launcher_code if launcher_code > 0 else UNEXPECTED
    specific = failed - {UNEXPECTED}
    return specific.pop() if len(specific) == 1 else UNEXPECTED


@contextmanager
def collect_exit_codes(env: dict[str, str] | None = None) -> Iterator[Path]:
    """A fresh folder for the children's codes, named in ``env`` (default: this process's environment, restored
    afterwards); yields the folder."""
    target = os.environ if env is None else env
    before = target.get(EXIT_CODE_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="exit-codes-") as folder:
        target[EXIT_CODE_DIR_ENV] = folder
        try:
            yield Path(folder)
        finally:
            if before is None:
                target.pop(EXIT_CODE_DIR_ENV, None)
            else:
                target[EXIT_CODE_DIR_ENV] = before
