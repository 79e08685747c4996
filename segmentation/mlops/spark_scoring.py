"""Batch scoring on Spark with the serving pyfunc: image files in, PNG masks and one table row per image out.

Files are read with Spark's ``binaryFile`` source and scored with ``mlflow.pyfunc.spark_udf`` over the logged
model, i.e. with the contract of ``mlflow models serve`` (:mod:`segmentation.mlops.serving`). The pyfunc refuses a
whole batch when one image in it is corrupt (the server's HTTP 400), so every file is first checked with the
pyfunc's own decoder (:func:`~segmentation.mlops.serving_requests.decode_image`) and the same limits: a file it refuses
becomes a row with an ``error`` and never reaches the model. Executors write the masks with atomic renames, so a
retried or speculative task only rewrites a file with the same bytes.
"""

from __future__ import annotations

import base64
import glob
import os
import posixpath
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from pyspark import SparkConf, cloudpickle
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf

from segmentation.inference.files import IMAGE_SUFFIXES
from segmentation.io import write_bytes_atomic
from segmentation.mlops.model_store import CODE_DIR
from segmentation.mlops.serving_requests import IMAGE_COLUMN, LIMIT_ENV, decode_image

MAX_PIXELS_ENV, MAX_REQUEST_BYTES_ENV = LIMIT_ENV["max_pixels"], LIMIT_ENV["max_request_bytes"]

ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")  # mlflow.pyfunc.spark_udf's choices
MASK_DIR, COLOR_DIR, CITYSCAPES_DIR = "mask", "color", "cityscapes"
CHECK_TYPE = "image string, error string"
TABLE_TYPE = (
    "path string, height bigint, width bigint, mask_path string, color_path string, label_ids_path string, "
    "error string, pixels array<bigint>"
)
# Spark's estimate of the cost of opening a file, in bytes (default 4 MiB). With the default, a task gets at most
# 32 small images, and `spark_udf` with env_manager=local on a local master loads the model once per task.
OPEN_COST_BYTES = 64 * 1024


@dataclass(frozen=True)
class ImageSource:
    """What Spark lists: ``root`` (a folder path or URI), a file-name glob and whether to descend into folders."""

    root: str
    pattern: str = ""  # Hadoop glob on the file name (pathGlobFilter); empty: the image suffixes `predict` reads
    recursive: bool = True


@dataclass(frozen=True)
class OutputSpec:
    """What the executors need to write one image's outputs."""

    out_dir: str  # a local folder, shared by every executor on a cluster
    root_prefix: str  # the qualified input root + "/": output names are input paths relative to it
    num_classes: int
    colorize: bool
    label_ids: tuple[int, ...] = ()  # class index -> Cityscapes label id: also write the benchmark's labelIds PNGs


def image_source(spec: str) -> ImageSource:
    """A folder (searched recursively), one file, ``DIR/PATTERN`` (that folder only) or ``DIR/**/PATTERN``.

    Raises:
        ValueError: wildcards in a folder name, which Spark's ``pathGlobFilter`` cannot express.
    """
    spec = spec.rstrip("/") or "/"
    if not glob.has_magic(spec):
        if Path(spec).is_file():
            return ImageSource(str(Path(spec).parent), Path(spec).name, recursive=False)
        return ImageSource(spec)
    head, pattern = posixpath.split(spec)
    if pattern == "**":  # DIR/** : every file below DIR
        head, pattern = spec, "*"
    recursive = posixpath.basename(head) == "**"
    root = posixpath.dirname(head) if recursive else head
    if glob.has_magic(root):
        raise ValueError(
            f"input {spec!r}: wildcards are allowed in the file name only, e.g. 'images/*.png' (that folder) or "
            "'images/**/*.png' (and every folder below it); found one in the folder part "
            f"{root!r}. Give the folder itself to read every image below it"
        )
    return ImageSource(root or ".", pattern, recursive)


def start_session(master: str, batch_size: int, app_name: str = "segmentation-batch-predict") -> SparkSession:
    """A Spark session on ``master``; empty: the master spark-submit or spark-defaults.conf names, else local[*].

    Each Arrow batch handed to the pyfunc holds ``batch_size`` images. On a local master the Python workers run
    this interpreter unless ``PYSPARK_PYTHON`` says otherwise.
    """
    conf = SparkConf()  # holds what spark-submit --master/--conf set
    if master:
        conf.setMaster(master)
    elif not conf.contains("spark.master"):
        conf.setMaster("local[*]")
    if conf.get("spark.master").startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # pyspark reads it when the context starts
    conf.setAppName(app_name).set("spark.ui.showConsoleProgress", "false")
    conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    if not conf.contains("spark.sql.files.openCostInBytes"):
        conf.set("spark.sql.files.openCostInBytes", str(OPEN_COST_BYTES))
    return SparkSession.builder.config(conf=conf).getOrCreate()


def ship_code(spark: SparkSession, work_dir: str | Path) -> None:
    """Make this ``segmentation`` package importable on the executors, and send this module's functions by value.

    By value, because with env_manager=local a worker that loaded the model first imports ``segmentation`` from
    the model's own logged code, which may predate this module.
    """
    archive = Path(work_dir) / "segmentation.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(CODE_DIR.rglob("*.py")):
            zf.write(path, path.relative_to(CODE_DIR.parent).as_posix())
    spark.sparkContext.addPyFile(str(archive))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def qualify(spark: SparkSession, path: str) -> tuple[str, bool]:
    """``path`` as Spark names files under it (``/data`` -> ``file:/data``), and whether it exists."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return fs.makeQualified(hadoop_path).toString(), bool(fs.exists(hadoop_path))


def read_files(spark: SparkSession, source: ImageSource, exclude_prefix: str = "") -> DataFrame:
    """``path, content`` of every file ``source`` names, except those under ``exclude_prefix`` (the output)."""
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", str(source.recursive).lower())
    if source.pattern:
        reader = reader.option("pathGlobFilter", source.pattern)
    files = reader.load(source.root).select("path", "content")
    if not source.pattern:
        suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        files = files.where(F.lower("path").rlike(rf"\.({suffixes})$"))
    if exclude_prefix:
        files = files.where(~F.col("path").startswith(exclude_prefix))
    return files


def output_stem(path: str, root_prefix: str) -> str:
    """The input path relative to the root, without its suffix: ``file:/in/a/b.jpg`` -> ``a/b``."""
    relative = path[len(root_prefix) :] if path.startswith(root_prefix) else posixpath.basename(path)
    return posixpath.splitext(relative)[0]


def duplicate_outputs(files: DataFrame, limit: int = 3) -> list[list[str]]:
    """Groups of input paths that would write the same mask (``a.png`` and ``a.jpg``); at most ``limit``."""
    stem = F.regexp_replace("path", r"\.[^./]*$", "")
    groups = files.groupBy(stem.alias("stem")).agg(F.count("*").alias("n"), F.sort_array(F.collect_list("path")))
    return [list(row[2]) for row in groups.where("n > 1").limit(limit).collect()]


def check_image(data: bytes, max_pixels: int, max_bytes: int) -> tuple[str | None, str | None]:
    """``(base64 text, None)`` for a file the pyfunc accepts, else ``(None, the pyfunc's 400 message)``."""
    text = base64.b64encode(bytes(data)).decode("ascii")
    if len(text) > max_bytes:
        return None, (
            f"{len(text)} bytes of base64 image data, more than the limit of {max_bytes} bytes per request "
            f"({MAX_REQUEST_BYTES_ENV} sets it)"
        )
    try:
        decode_image(text, max_pixels)
    except MlflowException as exc:
        return None, exc.message.removeprefix(f"row 0, column '{IMAGE_COLUMN}': ")
    return text, None


def write_outputs(row: pd.Series, out: OutputSpec) -> dict:
    """Write one scored image's mask (and colour mask) under ``out.out_dir``; its table row with pixel counts."""
    stem = output_stem(row["path"], out.root_prefix)
    mask_png = base64.b64decode(row["mask"])
    mask = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    counts = np.bincount(mask.ravel(), minlength=out.num_classes)
    if len(counts) > out.num_classes:  # the pyfunc's masks hold argmax ids: an invariant, not user input
        raise RuntimeError(f"{row['path']}: mask holds class id {len(counts) - 1} >= {out.num_classes} classes")
    mask_path = f"{MASK_DIR}/{stem}.png"
    write_bytes_atomic(Path(out.out_dir) / mask_path, mask_png)
    color_path = None
    if out.colorize:
        color_path = f"{COLOR_DIR}/{stem}.png"
        write_bytes_atomic(Path(out.out_dir) / color_path, base64.b64decode(row["colorized"]))
    label_ids_path = None
    if out.label_ids:  # named after the input, as the benchmark matches <city>_<seq>_<frame>*.png
        label_ids_path = f"{CITYSCAPES_DIR}/{stem}.png"
        ok, png = cv2.imencode(".png", np.asarray(out.label_ids, dtype=np.uint8)[mask])
        if not ok:
            raise RuntimeError(f"{row['path']}: could not encode its label-id mask as PNG")
        write_bytes_atomic(Path(out.out_dir) / label_ids_path, png.tobytes())
    return {
        "path": row["path"],
        "height": int(row["height"]),
        "width": int(row["width"]),
        "mask_path": mask_path,
        "color_path": color_path,
        "label_ids_path": label_ids_path,
        "error": None,
        "pixels": counts.tolist(),
    }


def score_files(
    spark: SparkSession,
    files: DataFrame,
    model_path: str,
    out: OutputSpec,
    *,
    env_manager: str = "local",
    max_pixels: int,
    max_bytes: int,
    batch_size: int,
) -> DataFrame:
    """One :data:`TABLE_TYPE` row per file: the written outputs and pixel counts, or the error that kept it out.

    Args:
        files: ``path, content`` (:func:`read_files`).
        model_path: a local MLflow model folder (the serving pyfunc), shipped to the executors by ``spark_udf``.
        out: where and what to write.
        env_manager: how ``spark_udf`` builds the model's Python environment on the executors.
        max_pixels, max_bytes: the pyfunc's per-image limits, applied before scoring.
        batch_size: images per Arrow batch (the executors' spark.sql.execution.arrow.maxRecordsPerBatch).
    """
    if env_manager not in ENV_MANAGERS:
        raise ValueError(f"env_manager {env_manager!r} is not one of {', '.join(ENV_MANAGERS)}")

    def check(content: pd.Series) -> pd.DataFrame:
        return pd.DataFrame([check_image(d, max_pixels, max_bytes) for d in content], columns=["image", "error"])

    # Nondeterministic: Spark must call it once per row, not once per field read from its struct.
    checker = pandas_udf(check, CHECK_TYPE).asNondeterministic()
    sc = spark.sparkContext
    if sc.master.startswith("local"):
        # One task per core: on a local master spark_udf loads the model in every task (a cluster's workers cache
        # it), and Spark's file packing can leave a small last partition that costs a second wave of loads.
        files = files.coalesce(sc.defaultParallelism)
    checked = files.select("path", checker("content").alias("check"))
    # Every image that reaches the model passed the same limits, so a batch of them is under batch_size x limit.
    model_env = {
        MAX_PIXELS_ENV: str(max_pixels),
        MAX_REQUEST_BYTES_ENV: str(batch_size * max_bytes),
        LIMIT_ENV["max_request_pixels"]: str(batch_size * max_pixels),
        LIMIT_ENV["max_rows"]: str(max(batch_size, 1)),
    }
    result_type = "mask string, height long, width long" + (", colorized string" if out.colorize else "")
    model_udf = mlflow.pyfunc.spark_udf(
        spark,
        model_path,
        result_type=result_type,
        env_manager=env_manager,
        params={"colorize": True} if out.colorize else None,
        extra_env=model_env,
    )
    predicted = checked.where("check.error IS NULL").select(
        "path", model_udf(F.struct(F.col("check.image").alias(IMAGE_COLUMN))).alias("p")
    )

    def write(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            yield pd.DataFrame([write_outputs(row, out) for _, row in batch.iterrows()], columns=_TABLE_COLUMNS)

    written = predicted.select("path", "p.*").mapInPandas(write, TABLE_TYPE)
    refused = checked.where("check.error IS NOT NULL").select(
        *(
            F.col(c) if c == "path" else F.col("check.error").alias("error") if c == "error" else _null(c)
            for c in _TABLE_COLUMNS
        )
    )
    return written.unionByName(refused)


_TABLE_TYPES = dict(part.split(" ", 1) for part in TABLE_TYPE.split(", "))
_TABLE_COLUMNS = list(_TABLE_TYPES)


def _null(name: str) -> Column:
    return F.lit(None).cast(_TABLE_TYPES[name]).alias(name)
