"""The ``evaluate`` step: score a model on a whole split inside an MLflow run, record it on the registered version
and optionally promote it."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import mlflow.data
import pandas as pd

from segmentation.config import AugmentationConfig, EvalConfig
from segmentation.data.datasets import SegmentationDataset, load_split
from segmentation.data.transforms import build_val_transforms
from segmentation.evaluation.evaluate import EvalResult, check_classes, evaluate_model
from segmentation.inference.predictor import DEFAULT_BACKEND, resolve_device
from segmentation.mlops import promotion, registry
from segmentation.mlops.eval_logging import data_key, log_evaluation
from segmentation.mlops.model_store import load_model
from segmentation.mlops.runs import attached_run

logger = logging.getLogger(__name__)
_DEFAULTS = EvalConfig()


@dataclass(frozen=True)
class Protocol:
    """How an evaluation was run; stored on the model version so the same evaluation can be repeated."""

    data: str
    split: str = "val"
    split_id: str = "split01"
    batch_size: int = _DEFAULTS.batch_size
    tta: str = _DEFAULTS.tta
    scales: tuple[float, ...] = tuple(_DEFAULTS.scales)
    sliding_window: int = _DEFAULTS.sliding_window
    num_worst: int = _DEFAULTS.num_worst
    device: str = "auto"
    backend: str = DEFAULT_BACKEND

    def to_json(self) -> str:
        keys = ("data", "split", "split_id", "tta", "scales", "sliding_window")
        return json.dumps({k: getattr(self, k) for k in keys})


def _evaluate(model_uri: str, protocol: Protocol, num_worst: int) -> tuple[EvalResult, str, pd.DataFrame]:
    model, classes = load_model(model_uri)
    table, data_classes, root = load_split(protocol.data, protocol.split_id)
    check_classes(classes, data_classes)
    # Default augmentation settings keep validation images at full resolution (val_height = val_width = 0).
    dataset = SegmentationDataset(
        table,
        protocol.split,
        build_val_transforms(AugmentationConfig()),
        root,
        num_classes=classes.num_classes,
        ignore_index=classes.ignore_index,
    )
    result = evaluate_model(
        model,
        classes,
        dataset,
        batch_size=protocol.batch_size,
        tta=protocol.tta,
        scales=protocol.scales,
        sliding_window=protocol.sliding_window,
        num_worst=num_worst,
        device=resolve_device(protocol.device),
        backend=protocol.backend,
    )
    key = data_key(
        table, protocol.split, protocol.split_id, protocol.tta, protocol.sliding_window, protocol.scales, root
    )
    return result, key, table[table["split"] == protocol.split].reset_index(drop=True)


def incumbent_evaluator(model_name: str, protocol: Protocol):
    def evaluate_incumbent(version: str) -> float:
        logger.info("production version %s has no score on this data: evaluating it now", version)
        result, _, _ = _evaluate(f"models:/{model_name}/{version}", protocol, num_worst=0)
        return result.metrics["eval/mIoU"]

    return evaluate_incumbent


def promotion_tags(outcome: promotion.Promotion) -> dict[str, str]:
    # promotion/companions: where the companion models' aliases (the ONNX export's production) now point.
    return {
        "promotion/promoted": str(outcome.promoted),
        "promotion/reason": outcome.reason,
        "promotion/companions": json.dumps(outcome.companions, sort_keys=True),
    }


def evaluate_step(
    model_uri: str, protocol: Protocol, promote: bool = False, force: bool = False, alias: str = registry.PRODUCTION
) -> tuple[EvalResult, promotion.Promotion | None]:
    """Evaluate ``model_uri`` on ``protocol.data`` inside an MLflow run, log everything and optionally promote.

    Raises:
        ValueError: ``promote`` for a model that is not a registered version, classes that differ, or an
            unresolvable model URI (from :func:`segmentation.mlops.model_store.load_model`).
    """
    ref = registry.describe_model_uri(model_uri)
    if promote and not (ref.name and ref.version):
        raise ValueError(
            f"promote=true needs a registered model (models:/<name>/<version>, models:/<name>/latest "
            f"or models:/<name>@alias), got model_uri={model_uri!r}"
        )
    protocol = Protocol(**{**asdict(protocol), "data": str(Path(protocol.data).resolve())})
    with attached_run(run_name="evaluate") as run_id:
        result, key, rows = _evaluate(model_uri, protocol, protocol.num_worst)
        tags = {**ref.tags, registry.DATA_TAG: key, "eval/split": protocol.split, "eval/tta": protocol.tta}
        if protocol.tta == "multiscale":
            tags["eval/scales"] = ",".join(repr(float(scale)) for scale in protocol.scales)
        dataset = mlflow.data.from_pandas(
            rows, source=protocol.data, name=f"{Path(protocol.data).name}/{protocol.split_id}/{protocol.split}"
        )
        log_evaluation(result, tags, dataset=dataset, model_id=ref.model_id)
        mlflow.flush_async_logging()
        outcome = None
        if ref.name and ref.version:
            registry.record_evaluation(
                ref.name,
                ref.version,
                result.metrics["eval/mIoU"],
                key,
                run_id,
                extra_tags={
                    registry.PROTOCOL_TAG: protocol.to_json(),
                    **{k: repr(result.metrics[k]) for k in ("eval/pixel_acc", "eval/mean_acc") if k in result.metrics},
                },
            )
        if promote:
            outcome = promotion.promote(
                ref.name,
                ref.version,
                alias=alias,
                candidate_value=result.metrics["eval/mIoU"],
                data_key=key,
                evaluate_incumbent=incumbent_evaluator(ref.name, protocol),
                force=force,
                run_id=run_id,
            )
            mlflow.set_tags(promotion_tags(outcome))
    return result, outcome
