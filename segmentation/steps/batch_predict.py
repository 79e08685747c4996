"""The ``batch_predict`` step: score a folder or glob of images on Spark with a logged model's serving pyfunc.

Writes ``<out_dir>/mask/<name>.png`` (class ids), ``<out_dir>/color/<name>.png`` with ``colorize``,
``<out_dir>/cityscapes/<name>.png`` (Cityscapes label ids, the benchmark's results) with ``cityscapes``, and
``<out_dir>/predictions.parquet``: one row per input file with ``path, height, width, mask_path, error`` and one
``pixels_<class>`` column per class of the model. A file the pyfunc refuses (corrupt, not PNG/JPEG, too large) is
a row with an ``error``, not a failed job. See :mod:`segmentation.mlops.spark_scoring` for how.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pyspark

from segmentation.data.cityscapes_labels import class_to_label_id_lut
from segmentation.data.classes import ClassInfo
from segmentation.io import atomic_path
from segmentation.mlops import registry
from segmentation.mlops.runs import attached_run
from segmentation.mlops.serving_requests import load_limits
from segmentation.mlops.spark_scoring import (
    ENV_MANAGERS,
    TABLE_TYPE,
    OutputSpec,
    duplicate_outputs,
    image_source,
    qualify,
    read_files,
    score_files,
    ship_code,
    start_session,
)
from segmentation.models.package import META_FILE, URI_FORMS, read_package_meta

logger = logging.getLogger(__name__)

TABLE_FILE = "predictions.parquet"
PIXELS_PREFIX = "pixels_"
DEFAULT_MASTER = "local[*]"


@dataclass(frozen=True)
class BatchReport:
    """What a batch prediction wrote: the table, how many files it scored and refused, and the scoring time."""

    out_dir: Path
    table: Path
    images: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def required_java() -> int:
    """The oldest Java the installed Spark runs on (Spark 4: 17; Spark 3: 8)."""
    return 17 if int(pyspark.__version__.split(".")[0]) >= 4 else 8


def check_java() -> str:
    """The ``java -version`` line of the Java Spark will start (``JAVA_HOME``, else ``java`` on PATH).

    Raises:
        FileNotFoundError: no Java; the message says which version to install.
        ValueError: a Java older than Spark needs.
    """
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    need = required_java()
    if not java or not Path(java).is_file():
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no `java` on PATH and JAVA_HOME is unset"
        raise FileNotFoundError(
            f"batch_predict runs Spark {pyspark.__version__}, which needs Java {need} or newer: {where}. Install a "
            f"JDK/JRE {need}+ (e.g. `apt-get install openjdk-{need}-jre-headless`) or point JAVA_HOME at one"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    line = (out.stderr or out.stdout).strip().splitlines()[0] if (out.stderr or out.stdout).strip() else ""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', line)
    if match:
        major = int(match.group(2)) if match.group(1) == "1" else int(match.group(1))  # "1.8.0" is Java 8
        if major < need:
            raise ValueError(
                f"batch_predict runs Spark {pyspark.__version__}, which needs Java {need} or newer; {java} is "
                f"Java {major} ({line}). Install Java {need}+ and point JAVA_HOME at it"
            )
    return line


def resolve_model(model_uri: str, dst: str | Path) -> tuple[Path, ClassInfo]:
    """Download the model once (so an alias resolves to one version for the whole job) and read its classes.

    Raises:
        ValueError: the URI does not resolve or is not a served segmentation model.
        FileNotFoundError: a local path that does not exist.
    """
    local = Path(model_uri)
    if not local.exists():
        if "://" not in model_uri and not model_uri.startswith(("runs:/", "models:/")):
            raise FileNotFoundError(f"model '{model_uri}': no such folder, and not an MLflow URI")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        except Exception as exc:  # MlflowException, OSError...: say what was asked for and what is accepted
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            accepted = ", ".join(URI_FORMS[:3])
            raise ValueError(f"could not download model '{model_uri}': {first}. Accepted: {accepted}") from None
    metas = sorted(local.glob(f"artifacts/*/{META_FILE}")) if (local / "MLmodel").is_file() else []
    if not metas:
        raise ValueError(
            f"'{model_uri}' is not a logged segmentation model: batch_predict needs the serving pyfunc (an MLflow "
            f"model folder with MLmodel and artifacts/<package>/{META_FILE}), as `train` and `export` log it"
        )
    return local, ClassInfo.from_dict(read_package_meta(metas[0].parent)["classes"])


def local_path(path: str) -> str:
    """Spark's ``file:/a/b.png`` as ``/a/b.png``; other URIs unchanged."""
    return path.removeprefix("file://") if path.startswith("file://") else path.removeprefix("file:")


def build_table(rows: list[dict], classes: ClassInfo, colorize: bool, cityscapes: bool = False) -> pd.DataFrame:
    """The Parquet table: one row per file sorted by path, with ``pixels_<class>`` counts (null for errors)."""
    columns = [part.split()[0] for part in TABLE_TYPE.split(", ")]
    table = pd.DataFrame(rows, columns=columns)
    counts = pd.DataFrame(
        [pixels if pixels is not None else [None] * classes.num_classes for pixels in table.pop("pixels")],
        columns=[PIXELS_PREFIX + name for name in classes.names],
        dtype="Int64",
    )
    table = pd.concat([table, counts], axis=1)
    table["path"] = table["path"].map(local_path)
    table[["height", "width"]] = table[["height", "width"]].astype("Int64")
    if not colorize:
        table = table.drop(columns="color_path")
    if not cityscapes:
        table = table.drop(columns="label_ids_path")
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def batch_predict_step(
    model_uri: str,
    input_spec: str,
    out_dir: str | Path,
    *,
    master: str = DEFAULT_MASTER,
    colorize: bool = False,
    cityscapes: bool = False,
    env_manager: str = "local",
    batch_size: int = 8,
) -> BatchReport:
    """Score every image ``input_spec`` names on Spark and write masks and the table under ``out_dir``.

    Args:
        model_uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<id>/<path>`` or a local MLflow
            model folder logged by this project.
        input_spec: a folder (every image below it), one file, ``DIR/PATTERN`` or ``DIR/**/PATTERN``; a path or a
            URI Spark can read (``hdfs://...``).
        out_dir: a local folder; on a cluster, one every executor mounts at the same path.
        master: the Spark master (``local[2]``, ``spark://host:7077``, ...); empty: spark-submit's.
        colorize: also write colour masks (``color/``).
        cityscapes: also write the Cityscapes benchmark's results (``cityscapes/``: label ids, not train ids, named
            after the input), for a model whose class names are Cityscapes labels.
        env_manager: ``mlflow.pyfunc.spark_udf``'s: ``local`` (the executors' Python), ``virtualenv``, ``uv``,
            ``conda`` (the model's logged requirements, built once per executor).
        batch_size: images per call of the pyfunc.

    Raises:
        FileNotFoundError: no Java, or the input does not exist.
        ValueError: a bad parameter, a model that does not resolve, no images, two inputs writing the same mask,
            or every image refused (the table is written first).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if env_manager not in ENV_MANAGERS:
        raise ValueError(f"env_manager {env_manager!r} is not one of {', '.join(ENV_MANAGERS)}")
    if "://" in str(out_dir):
        raise ValueError(f"output {out_dir!r}: expected a local folder (shared by the executors on a cluster)")
    source = image_source(str(input_spec))
    if "://" not in source.root and not Path(source.root).exists():
        raise FileNotFoundError(f"input not found: {input_spec!r} (expected a folder, an image file or a glob)")
    logger.info("Java: %s", check_java())
    out = Path(out_dir).resolve()
    limits = load_limits()  # the serving limits, with the same environment variables
    max_pixels, max_bytes = limits.max_pixels, limits.max_request_bytes
    with tempfile.TemporaryDirectory(prefix="batch-predict-") as tmp:
        model_dir, classes = resolve_model(model_uri, tmp)
        label_ids = (
            tuple(int(v) for v in class_to_label_id_lut(classes.names)[: classes.num_classes]) if cityscapes else ()
        )
        spark = start_session(master, batch_size)
        try:
            ship_code(spark, tmp)
            root, exists = qualify(spark, source.root)
            if not exists:
                raise FileNotFoundError(f"input not found: {input_spec!r} ({root} does not exist)")
            files = read_files(spark, source, exclude_prefix=qualify(spark, str(out))[0] + "/")
            clashes = duplicate_outputs(files)
            if clashes:
                raise ValueError(
                    "inputs that would write the same mask (rename one or predict them separately): "
                    + "; ".join(" and ".join(map(local_path, group)) for group in clashes)
                )
            spec = OutputSpec(str(out), root.rstrip("/") + "/", classes.num_classes, colorize, label_ids)
            started = time.perf_counter()
            scored = score_files(
                spark,
                files,
                str(model_dir),
                spec,
                env_manager=env_manager,
                max_pixels=max_pixels,
                max_bytes=max_bytes,
                batch_size=batch_size,
            )
            rows = [row.asDict() for row in scored.collect()]
            seconds = time.perf_counter() - started
        finally:
            spark.stop()
    if not rows:
        raise ValueError(f"no images under {input_spec!r} (outputs under {out} are not inputs)")
    table = build_table(rows, classes, colorize, cityscapes)
    with atomic_path(out / TABLE_FILE) as tmp_table:
        table.to_parquet(tmp_table, index=False)
    failed = int(table["error"].notna().sum())
    report = BatchReport(out, out / TABLE_FILE, len(table), failed, seconds)
    with attached_run(create=False) as run_id:  # under `mlflow run`: the counts go into its run
        if run_id:
            mlflow.set_tags(registry.describe_model_uri(model_uri).tags)
            mlflow.log_metrics(
                {"batch/images": report.images, "batch/failed": failed, "batch/images_per_s": report.images_per_s}
            )
    if failed:
        logger.warning("%d of %d file(s) refused; see the error column of %s", failed, report.images, report.table)
    if failed == report.images:
        raise ValueError(f"none of the {report.images} file(s) could be scored; the errors are in {report.table}")
    return report
