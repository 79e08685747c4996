"""Promotion under concurrency and with scores that cannot be compared, against the session's real tracking server:
many promoters at once end with the best version in ``production`` and the one it displaced in ``previous``; a NaN
score (an unlabeled split) is never promoted unless forced."""

from __future__ import annotations

import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.data.preprocess import run_preprocess
from segmentation.mlops import promotion, registry
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.models import FCHarDNet
from segmentation.steps.evaluate import Protocol, evaluate_step

DATA = "split01/val#abc|tta=none"


def _registered_model(client: MlflowClient, versions: int) -> str:
    """A registered model with ``versions`` versions, each pointing at a small artifact of its own run."""
    name = f"race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(versions):
        with mlflow.start_run() as run:
            mlflow.log_text("placeholder", "model/README.txt")
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return name


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_promoters_end_with_the_best_in_production_and_its_predecessor_in_previous(attempt, tracking_uri):
    client = MlflowClient(tracking_uri)
    promoters = 6
    name = _registered_model(client, promoters + 1)
    promotion.promote(name, 1, candidate_value=0.05, data_key=DATA, client=client)  # the holder they all challenge
    scores = {str(v): s for v, s in zip(range(2, promoters + 2), random.sample(range(1, 90), promoters), strict=True)}
    scores = {v: s / 100 for v, s in scores.items()}
    barrier = threading.Barrier(promoters)

    def promote(version: str) -> promotion.Promotion:
        own_client = MlflowClient(tracking_uri)
        barrier.wait()
        return promotion.promote(name, version, candidate_value=scores[version], data_key=DATA, client=own_client)

    with ThreadPoolExecutor(promoters) as pool:
        outcomes = list(pool.map(promote, scores))
    aliases = registry.aliases_of(name, client)
    best = max(scores, key=scores.get)
    assert aliases["production"] == best, f"scores {scores}: production is {aliases['production']}, not {best}"
    # The promotions that moved the alias form one chain from version 1 to the best: each displaced the previous
    # one. A lost update shows as two promotions displacing the same holder.
    moved = {o.incumbent: o.version for o in outcomes if o.promoted}
    assert len(moved) == sum(o.promoted for o in outcomes), f"two promotions displaced the same holder: {outcomes}"
    chain, holder = ["1"], "1"
    while holder in moved:
        holder = moved[holder]
        chain.append(holder)
    assert holder == best and len(chain) == len(moved) + 1, f"broken chain {chain} for {moved}"
    assert aliases["previous"] == chain[-2], f"previous is {aliases['previous']}, displaced was {chain[-2]}"
    assert [scores.get(v, 0.05) for v in chain] == sorted(scores.get(v, 0.05) for v in chain)
    for outcome in outcomes:  # every candidate was compared with the holder of its time, and says so
        reason = client.get_model_version(name, outcome.version).tags["promotion_reason"]
        assert f"version {outcome.incumbent} " in reason, reason
    assert promotion.PROMOTION_LOCK_TAG not in client.get_registered_model(name).tags


def test_rollback_waits_for_a_running_promotion(tracking_uri):
    client = MlflowClient(tracking_uri)
    name = _registered_model(client, 3)
    promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    promotion.promote(name, 2, candidate_value=0.6, data_key=DATA, client=client)
    started, order = threading.Event(), []

    def slow_incumbent_evaluation(version: str) -> float:  # promotion 3 has to score the holder on new data
        started.set()
        threading.Event().wait(3.0)
        order.append("evaluated")
        return 0.1

    with ThreadPoolExecutor(2) as pool:
        promoting = pool.submit(
            promotion.promote,
            name,
            3,
            candidate_value=0.7,
            data_key="other",
            client=MlflowClient(tracking_uri),
            evaluate_incumbent=slow_incumbent_evaluation,
        )
        assert started.wait(60)
        back = pool.submit(promotion.rollback, name, client=MlflowClient(tracking_uri))
        back.add_done_callback(lambda _: order.append("rolled back"))
        assert promoting.result().promoted and back.result().version == "2"
    assert order == ["evaluated", "rolled back"]
    assert registry.aliases_of(name, client) == {"production": "2", "previous": "3"}


def test_a_nan_score_is_never_promoted_unless_forced(tracking_uri):
    client = MlflowClient(tracking_uri)
    name = _registered_model(client, 1)
    registry.record_evaluation(name, 1, float("nan"), DATA, client=client)
    with pytest.raises(ValueError, match=rf"version 1 of '{name}' scored eval/mIoU=nan on data '{DATA}'"):
        promotion.promote(name, 1, client=client)
    assert registry.aliases_of(name, client) == {}
    forced = promotion.promote(name, 1, force=True, client=client)
    assert forced.promoted and forced.forced and registry.aliases_of(name, client) == {"production": "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion_forced"] == "True" and tags["promotion_reason"].startswith("FORCED: eval/mIoU nan")


def test_evaluating_on_an_unlabeled_split_does_not_promote(tracking_uri, tmp_path):
    data = tmp_path / "data"
    run_preprocess("synthetic", "", data, num_images=5, height=64, width=128, val_fraction=0.4)
    table = pd.read_parquet(data / "split" / "split01.parquet")
    for mask in table.loc[table["split"] == "val", "mask"]:  # as preprocess lists a split without labels
        cv2.imwrite(str(data / mask), np.full((64, 128), 255, np.uint8))
    name = f"race-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run():
        info = log_pytorch_model(
            FCHarDNet(num_classes=19), ClassInfo.cityscapes(), ModelConfig(), registered_model_name=name
        )
    version = str(info.registered_model_version)
    with pytest.raises(ValueError, match=rf"version {version} of '{name}' scored eval/mIoU=nan"):
        evaluate_step(f"models:/{name}/{version}", Protocol(data=str(data), num_worst=0), promote=True)
    assert registry.aliases_of(name, MlflowClient(tracking_uri)) == {}
