"""Atomic file writes: write to a temporary file in the target folder, then rename over the target.

A reader (or a process killed mid-write) therefore sees either the old file or the complete new one. The fsync
helpers make a folder written in place durable before it is renamed (training checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    ``suffix`` defaults to the target's suffix so that writers which pick a format from the extension
    (``cv2.imwrite``, ``pandas.to_parquet``) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # a platform that cannot open folders (Windows) cannot fsync them either
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then its subfolders and itself (their entries)."""
    paths = sorted(folder.rglob("*"))
    for path in paths:
        if path.is_file():
            fsync_path(path)
    for path in [p for p in paths if p.is_dir()] + [folder]:
        fsync_path(path)
