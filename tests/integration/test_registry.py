"""Registry promotion against a real MLflow server: aliases move only for a better score, force, rollback, tags."""

from __future__ import annotations

import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import torch
from conftest import MLFLOW_RUN_VARS, new_sqlite_store
from mlflow import MlflowClient

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.data.preprocess import run_preprocess
from segmentation.mlops import companions, promotion, registry
from segmentation.mlops.model_store import log_pytorch_model
from segmentation.models import FCHarDNet
from segmentation.steps.evaluate import Protocol, evaluate_step

DATA = "split01/val#abc|tta=none"


def _registered_model(client: MlflowClient, versions: int) -> str:
    """A registered model with ``versions`` versions, each pointing at a small artifact of its own run."""
    name = f"seg-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    for _ in range(versions):
        with mlflow.start_run() as run:
            mlflow.log_text("placeholder", "model/README.txt")
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return name


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


@pytest.fixture
def client(tracking_uri) -> MlflowClient:
    return MlflowClient(tracking_uri)


def test_model_uris_resolve_to_name_version_and_run(client):
    name = _registered_model(client, 3)
    client.set_registered_model_alias(name, "production", "2")
    runs = {str(v.version): v.run_id for v in client.search_model_versions(f"name = '{name}'")}
    for uri, version in [
        (f"models:/{name}/1", "1"),
        (f"models:/{name}/latest", "3"),
        (f"models:/{name}@production", "2"),
    ]:
        ref = registry.describe_model_uri(uri, client)
        assert (ref.name, ref.version, ref.run_id) == (name, version, runs[version]), uri
    missing = registry.describe_model_uri("models:/no-such-model/latest", client)
    assert (missing.name, missing.version, missing.run_id) == ("no-such-model", None, None)


def test_alias_moves_only_when_at_least_as_good_and_previous_allows_rollback(client):
    name = _registered_model(client, 4)
    first = promotion.promote(name, 1, candidate_value=0.50, data_key=DATA, run_id="run-a", client=client)
    assert first.promoted and _aliases(client, name) == {"production": "1"}
    tags = client.get_model_version(name, "1").tags
    assert tags["promoted_by_run"] == "run-a" and float(tags["eval/mIoU"]) == 0.50
    assert tags["compared_with"].startswith("none") and tags["promotion_forced"] == "False"

    worse = promotion.promote(name, 2, candidate_value=0.40, data_key=DATA, client=client)
    assert not worse.promoted and _aliases(client, name) == {"production": "1"}
    assert client.get_model_version(name, "2").tags["promotion_reason"].startswith("not promoted")
    assert "promoted_by_run" not in client.get_model_version(name, "2").tags

    better = promotion.promote(name, 3, candidate_value=0.60, data_key=DATA, run_id="run-c", client=client)
    assert better.promoted and better.incumbent == "1" and better.incumbent_value == pytest.approx(0.50)
    assert _aliases(client, name) == {"production": "3", "previous": "1"}
    tags = client.get_model_version(name, "3").tags
    assert "version 1" in tags["compared_with"] and "0.500000" in tags["compared_with"]
    assert tags["eval/data"] == DATA

    equal = promotion.promote(name, 4, candidate_value=0.60, data_key=DATA, client=client)
    assert equal.promoted and _aliases(client, name) == {"production": "4", "previous": "3"}

    back = promotion.rollback(name, client=client)
    assert back.version == "3" and _aliases(client, name) == {"production": "3", "previous": "4"}
    assert "rollback" in client.get_model_version(name, "3").tags["promotion_reason"]


def test_another_alias_keeps_its_own_rollback_target(client):
    """Promoting ``staging`` twice must not change what rolling back ``production`` restores."""
    name = _registered_model(client, 4)
    promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    promotion.promote(name, 2, candidate_value=0.6, data_key=DATA, client=client)
    promotion.promote(name, 3, alias="staging", candidate_value=0.1, data_key=DATA, client=client)
    promotion.promote(name, 4, alias="staging", candidate_value=0.2, data_key=DATA, client=client)
    assert _aliases(client, name) == {"production": "2", "previous": "1", "staging": "4", "previous-staging": "3"}
    assert promotion.rollback(name, client=client).version == "1"
    assert promotion.rollback(name, alias="staging", client=client).version == "3"
    assert _aliases(client, name) == {"production": "1", "previous": "2", "staging": "3", "previous-staging": "4"}


def test_force_promotes_a_worse_version_and_says_so(client):
    name = _registered_model(client, 2)
    promotion.promote(name, 1, candidate_value=0.7, data_key=DATA, client=client)
    forced = promotion.promote(name, 2, candidate_value=0.1, data_key=DATA, force=True, client=client)
    assert forced.promoted and forced.forced
    assert _aliases(client, name) == {"production": "2", "previous": "1"}
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion_forced"] == "True" and tags["promotion_reason"].startswith("FORCED")


def test_scores_are_read_from_tags_and_compared_only_on_the_same_data(client):
    name = _registered_model(client, 2)
    registry.record_evaluation(name, 1, 0.8, DATA, client=client)
    promotion.promote(name, 1, client=client)  # number and data key both come from the version's tags
    registry.record_evaluation(name, 2, 0.9, "other/val#def|tta=none", client=client)
    with pytest.raises(ValueError, match="has no eval/mIoU on data 'other/val#def"):
        promotion.promote(name, 2, client=client)  # the incumbent was never scored on the other data
    asked: list[str] = []
    outcome = promotion.promote(name, 2, client=client, evaluate_incumbent=lambda v: asked.append(v) or 0.95)
    assert asked == ["1"] and not outcome.promoted and _aliases(client, name) == {"production": "1"}
    incumbent_tags = client.get_model_version(name, "1").tags  # the new number is kept for next time
    assert incumbent_tags["eval/data"] == "other/val#def|tta=none" and float(incumbent_tags["eval/mIoU"]) == 0.95


def test_incumbent_score_found_in_a_linked_evaluation_run(client):
    name = _registered_model(client, 2)
    promotion.promote(name, 1, force=True, client=client)  # production without any score
    with mlflow.start_run():
        mlflow.set_tags({"model_name": name, "model_version": "1", "eval/data": DATA})
        mlflow.log_metric("eval/mIoU", 0.3)
    outcome = promotion.promote(
        name,
        2,
        candidate_value=0.25,
        data_key=DATA,
        client=client,
        evaluate_incumbent=lambda v: pytest.fail("the linked run has the number"),
    )
    assert not outcome.promoted and outcome.incumbent_value == pytest.approx(0.3)


def test_unknown_version_or_model_lists_what_exists(client):
    name = _registered_model(client, 2)
    with pytest.raises(ValueError, match=r"no version '7'; existing versions: \[1, 2\]"):
        promotion.promote(name, 7, candidate_value=1.0, client=client)
    with pytest.raises(ValueError, match=f"registered model 'nope-{name}' does not exist.*{name}"):
        promotion.promote(f"nope-{name}", 1, candidate_value=1.0, client=client)
    with pytest.raises(ValueError, match="no 'previous' alias"):
        promotion.rollback(name, client=client)


def test_promotion_uses_no_deprecated_stages(client):
    name = _registered_model(client, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    assert client.get_model_version(name, "1").current_stage == "None"


def test_evaluation_run_is_logged_linked_and_promotes(client, tmp_path):
    data = tmp_path / "data"
    run_preprocess("synthetic", "", data, num_images=5, height=64, width=128, val_fraction=0.4)
    name = f"seg-{uuid.uuid4().hex[:8]}"
    torch_model = FCHarDNet(num_classes=19)
    with mlflow.start_run():
        info = log_pytorch_model(torch_model, ClassInfo.cityscapes(), ModelConfig(), registered_model_name=name)
    version = str(info.registered_model_version)
    result, outcome = evaluate_step(f"models:/{name}/{version}", Protocol(data=str(data), num_worst=1), promote=True)
    assert outcome.promoted and _aliases(client, name) == {"production": version}
    run_id = client.get_model_version(name, version).tags["promoted_by_run"]
    run = client.get_run(run_id)
    assert run.data.metrics["eval/mIoU"] == pytest.approx(result.metrics["eval/mIoU"])
    assert {"eval/pixel_acc", "eval/mean_acc", "eval/latency_ms_per_image", "eval/images_per_s"} <= set(
        run.data.metrics
    )
    assert any(k.startswith("eval/IoU/") for k in run.data.metrics)
    assert run.data.tags["model_name"] == name and run.data.tags["model_version"] == version
    assert run.data.tags["model_run_id"] == info.run_id and run.data.tags["eval/device"].startswith("cpu")
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/per_class.json", "eval/confusion_matrix.png", "eval/iou_per_class.png", "eval/worst"} <= artifacts
    assert len(client.list_artifacts(run_id, "eval/worst")) == 1
    version_tags = client.get_model_version(name, version).tags
    assert float(version_tags["eval/mIoU"]) == pytest.approx(result.metrics["eval/mIoU"])
    assert float(version_tags["eval/pixel_acc"]) == pytest.approx(result.metrics["eval/pixel_acc"])
    assert np.isfinite(result.latency.ms_per_image)
    # The split is the run's `evaluation` input, and the scores are linked to the evaluated model and that data.
    (evaluation_input,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in evaluation_input.tags}["mlflow.data.context"] == "evaluation"
    assert evaluation_input.dataset.name.endswith("/split01/val")
    model_id = registry.logged_model_id(client.get_model_version(name, version))
    scores = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert scores["eval/mIoU"].value == pytest.approx(result.metrics["eval/mIoU"])
    assert scores["eval/mIoU"].dataset_digest == evaluation_input.dataset.digest


def _exports(client: MlflowClient, source: str, source_versions: list[str]) -> str:
    """A companion model `<source>-onnx` with one version linked to each of ``source_versions``, in that order."""
    name = f"{source}-onnx"
    client.create_registered_model(name)
    for source_version in source_versions:
        with mlflow.start_run() as run:
            mlflow.log_text("placeholder", "onnx_model/README.txt")
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/onnx_model", run_id=run.info.run_id)
        companions.link_companion(name, mv.version, source, source_version, client=client)
    return name


def test_export_aliases_follow_promotion_and_rollback_of_their_source(client):
    name = _registered_model(client, 3)
    onnx = _exports(client, name, ["1", "2", "3"])  # onnx version n was made from version n
    unrelated = _registered_model(client, 1)
    client.set_registered_model_alias(unrelated, "production", "1")

    first = promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    assert first.companions == {onnx: {"production": "1"}} and _aliases(client, onnx) == {"production": "1"}

    worse = promotion.promote(name, 2, candidate_value=0.4, data_key=DATA, client=client)
    assert not worse.promoted and worse.companions == {} and _aliases(client, onnx) == {"production": "1"}

    better = promotion.promote(name, 3, candidate_value=0.6, data_key=DATA, client=client)
    assert better.companions == {onnx: {"production": "3", "previous": "1"}}
    assert _aliases(client, onnx) == {"production": "3", "previous": "1"}

    back = promotion.rollback(name, client=client)
    assert back.companions == {onnx: {"production": "1", "previous": "3"}}
    assert _aliases(client, onnx) == {"production": "1", "previous": "3"}
    assert _aliases(client, unrelated) == {"production": "1"}  # only models linked by the tags move


def test_newest_export_of_a_version_wins_and_an_unexported_version_leaves_the_alias(client, caplog):
    name = _registered_model(client, 2)
    onnx = _exports(client, name, ["1", "1"])  # version 1 exported twice; version 2 never
    promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    assert _aliases(client, onnx) == {"production": "2"}

    with caplog.at_level("WARNING", logger="segmentation.mlops.companions"):
        outcome = promotion.promote(name, 2, candidate_value=0.7, data_key=DATA, client=client)
    assert outcome.promoted and outcome.companions == {onnx: {"previous": "2"}}
    assert _aliases(client, onnx) == {"production": "2", "previous": "2"}
    assert f"has no version made from '{name}' version 2" in caplog.text and "export that version" in caplog.text


def test_exporting_the_production_version_gives_the_export_production(client):
    name = _registered_model(client, 2)
    promotion.promote(name, 2, candidate_value=0.5, data_key=DATA, client=client)
    onnx = _exports(client, name, ["1"])
    assert _aliases(client, onnx) == {}  # made from a version that holds no alias
    with mlflow.start_run() as run:
        mlflow.log_text("placeholder", "onnx_model/README.txt")
    mv = client.create_model_version(onnx, f"{run.info.artifact_uri}/onnx_model", run_id=run.info.run_id)
    assert companions.link_companion(onnx, mv.version, name, "2", client=client) == {"production": "2"}
    tags = client.get_model_version(onnx, "2").tags
    assert tags["source_model_name"] == name and tags["source_model_version"] == "2"
    assert _aliases(client, onnx) == {"production": "2"}


def test_pipeline_export_then_promote_moves_the_onnx_production(client):
    from segmentation.steps.export import export_step as run_export
    from segmentation.steps.promote import promote_step

    name = f"seg-{uuid.uuid4().hex[:8]}"
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with mlflow.start_run():
            info = log_pytorch_model(
                FCHarDNet(num_classes=19), ClassInfo.cityscapes(), ModelConfig(), registered_model_name=name
            )
        versions.append(str(info.registered_model_version))
        registry.record_evaluation(name, versions[-1], 0.1 * (seed + 1), DATA, client=client)
    promotion.promote(name, versions[0], client=client)
    # As the pipeline does it: export the candidate by version, then promote it.
    first = run_export(f"models:/{name}@production", registered_model=f"{name}-onnx", sizes=((64, 128),))
    assert first["aliases"] == {"production": "1"}
    second = run_export(f"models:/{name}/{versions[1]}", registered_model=f"{name}-onnx", sizes=((64, 128),))
    assert second["aliases"] == {} and _aliases(client, f"{name}-onnx") == {"production": "1"}
    run = client.get_run(client.get_model_version(f"{name}-onnx", "2").run_id)
    assert run.data.tags["source_model_version"] == versions[1]

    outcome = promote_step(name, versions[1])
    assert outcome.promoted and _aliases(client, f"{name}-onnx") == {"production": "2", "previous": "1"}
    served = mlflow.pyfunc.load_model(f"models:/{name}-onnx@production")
    assert served.metadata.metadata["backend"] == "onnx"


def test_a_sqlite_store_works_too(tmp_path, monkeypatch):
    # A sqlite store hands alias versions back as ints where the server gives strings; both must compare equal.
    uri = new_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in MLFLOW_RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = _registered_model(client, 2)
    onnx = _exports(client, name, ["1", "2"])
    promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    again = promotion.promote(name, 1, candidate_value=0.5, data_key=DATA, client=client)
    assert not again.promoted and "already holds" in again.reason
    assert registry.aliases_of(name, client) == {"production": "1"}
    promotion.promote(name, 2, candidate_value=0.6, data_key=DATA, client=client)
    assert registry.aliases_of(onnx, client) == {"production": "2", "previous": "1"}


def test_trainings_documenting_one_model_at_once_all_succeed(client):
    # Trainings registering versions of one model at the same moment each write its description and tags. MLflow's
    # SQL store creates a tag row after reading that it is missing, so two first writes of a tag can collide.
    names = [f"doc-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    writers = 6
    for name in names:
        client.create_registered_model(name)
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def document(writer: int) -> None:
        own_client = MlflowClient(client.tracking_uri)
        for name in names:
            barrier.wait()
            try:
                tags = {"task": "semantic-segmentation", "latest_version_run_id": f"run-{writer}"}
                registry.document_model(name, ["road", "sky"], tags, own_client)
            except BaseException as exc:  # collected, so that every writer keeps meeting the barrier
                errors.append(exc)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(document, range(writers)))
    assert not errors, [str(exc).splitlines()[0] for exc in errors]
    for name in names:
        tags = client.get_registered_model(name).tags
        assert tags["task"] == "semantic-segmentation" and tags["latest_version_run_id"].startswith("run-")
