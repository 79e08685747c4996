"""Moving a staged preprocess output into ``out_dir`` without breaking what is there or half-writing it.

A run builds everything in a staging folder inside ``out_dir``; :func:`publish` then swaps ``images/`` and
``interim/`` as a whole and moves the split files in, the table last. Two checks keep that swap safe: the samples'
output paths must not clash (checked before anything is written), and the split tables of other ``split_id`` values
already in ``out_dir`` must find every file they use unchanged (checked before the swap).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from segmentation.data.samples import RawSample

STAGING_PREFIX = ".preprocess-"


def image_suffix(sample: RawSample) -> str:
    """The extension of the sample's output image: its source's (copied as is), or ``.png`` when generated."""
    return sample.source.suffix if sample.source else ".png"


def check_output_paths(samples: list[RawSample]) -> None:
    """Refuse two samples where an output file of one would be a folder of the other's.

    CVAT images ``x.png`` and ``x.png/y.png`` give the keys ``x`` and ``x.png/y``: ``images/x.png`` would have to
    be a file and a folder. Found here, before anything is written, rather than as an OS error halfway through.

    Raises:
        ValueError: naming both samples' source files and keys.
    """
    files = {}
    for sample in samples:
        for suffix in {image_suffix(sample), ".png"}:  # images/<key><suffix>, interim/{gt,color}/<key>.png
            files[sample.key + suffix] = sample
    for sample in samples:
        parts = sample.key.split("/")
        for end in range(1, len(parts)):
            other = files.get("/".join(parts[:end]))
            if other is not None:
                raise ValueError(
                    f"{other.source or other.key} and {sample.source or sample.key} cannot both be written: "
                    f"{'/'.join(parts[:end])} would be the output file of the first (key {other.key!r}) and the "
                    f"folder holding the second's (key {sample.key!r}); rename one of them"
                )


def _same_bytes(old: Path, new: Path) -> bool:
    return new.is_file() and (os.path.samefile(old, new) or filecmp.cmp(old, new, shallow=False))


def _broken_by_run(table: Path, staging: Path, out_dir: Path) -> str | None:
    """How publishing ``staging`` would break ``table`` (a file it uses changed or dropped), or None."""
    try:
        rows = pd.read_parquet(table, columns=["image", "mask", "color"])
    except (OSError, ValueError, KeyError) as exc:
        return f"it cannot be read to check ({type(exc).__name__}: {exc})"
    for rel in ["split/classes.csv", "split/colormap.npy", *(str(v) for v in rows.to_numpy().ravel())]:
        # A file the table lists that is already missing is not lost by this run.
        if (out_dir / rel).is_file() and not _same_bytes(out_dir / rel, staging / rel):
            return f"its file {rel} would be {'replaced' if (staging / rel).is_file() else 'removed'}"
    return None


def check_other_tables(staging: Path, out_dir: Path, split_id: str) -> None:
    """Refuse to publish over files that a split table of another ``split_id`` in ``out_dir`` uses.

    Publishing replaces ``images/``, ``interim/`` and ``split/classes.csv`` as a whole. The same dataset split
    another way (another seed or ``val_fraction``) writes the same files and may share ``out_dir``; another dataset
    may not. Re-running ``split_id`` itself replaces its own table.

    Raises:
        ValueError: naming the table, the first file it would lose, and what to do instead.
    """
    for table in sorted((out_dir / "split").glob("*.parquet")):
        reason = None if table.stem == split_id else _broken_by_run(table, staging, out_dir)
        if reason is not None:
            raise ValueError(
                f"out_dir {out_dir} holds split table {table.name} (split_id {table.stem!r}), which this run "
                f"would break: {reason}. Tables in one out_dir share images/, interim/ and split/classes.csv, so "
                f"only splits of the same dataset can live together. Write split_id {split_id!r} to another "
                f"out_dir, or delete {table} and {table.stem}.stats.json first"
            )


def publish(staging: Path, out_dir: Path, split_id: str) -> None:
    """Move the staged folders and files into ``out_dir``; the split table is the commit point.

    The table being replaced goes first and the new one last, so a run stopped between the renames (a kill, a power
    loss) leaves no ``<split_id>`` table pairing new images with old masks: the next run finds none and makes it.
    """
    trash = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    table = out_dir / "split" / f"{split_id}.parquet"
    if table.exists():
        os.replace(table, trash / table.name)
    for folder in ("images", "interim"):
        if (out_dir / folder).exists():
            os.replace(out_dir / folder, trash / folder)
        os.replace(staging / folder, out_dir / folder)
    (out_dir / "split").mkdir(exist_ok=True)
    for name in ("classes.csv", "colormap.npy", f"{split_id}.stats.json", f"{split_id}.parquet"):
        os.replace(staging / "split" / name, out_dir / "split" / name)
    shutil.rmtree(trash, ignore_errors=True)
