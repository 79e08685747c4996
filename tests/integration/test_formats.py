"""Deployment formats: INT8 (static, QDQ, calibrated on the model's own training images) and FP16 ONNX, the accuracy
gate that keeps a format that lost too much mIoU out of the registry, and the served masks of every format."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from conftest import sqlite_tracking_store
from mlflow import MlflowClient

from segmentation.config_loading import CONFIG_DIR, load_config
from segmentation.inference.onnx import export_onnx
from segmentation.inference.predictor import Predictor, load_predictor
from segmentation.inference.quantize import conv_names, convert_fp16, default_int8_exclusions, quantize_int8
from segmentation.mlops.model_store import load_model, log_pytorch_model
from segmentation.mlops.serving import SegmentationModel
from segmentation.mlops.serving_requests import encode_image
from segmentation.models import FCHarDNet
from segmentation.steps.export import FormatRefused, export_step, load_images, parse_formats
from segmentation.training.engine import fit

TIMING = ((64, 128),)  # tests time the formats at one tiny size; users get 512x1024 and 1024x2048


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """The tiny model trained 40 steps on the 4 synthetic training images (untracked): its predictions carry
    information, so a broken format shows up in mIoU."""
    out = tmp_path_factory.mktemp("trained")
    overrides = [f"data.root={tiny_data}", f"train.output_dir={out}", "train.max_steps=40", "train.epochs=100"]
    overrides += ["train.val_every_n_steps=40", "train.sanity_val_batches=0", "train.num_val_images_logged=0"]
    result = fit(load_config(CONFIG_DIR / "tiny.yaml", overrides), log_model=False)
    return result.best_checkpoint


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with sqlite_tracking_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def source(trained, tracking) -> str:
    model, classes = load_model(str(trained))
    with mlflow.start_run():
        log_pytorch_model(model, classes, load_config(CONFIG_DIR / "tiny.yaml").model, registered_model_name="tiny")
    MlflowClient().set_registered_model_alias("tiny", "production", "1")
    return "models:/tiny@production"


@pytest.fixture(scope="module")
def exported(source, tiny_data) -> dict:
    return export_step(
        source, "onnx,onnx-int8,onnx-fp16", registered_model="tiny-onnx", data=str(tiny_data), timing_sizes=TIMING
    )


def test_format_list_is_parsed_and_checked():
    assert parse_formats("onnx, onnx-int8,onnx") == ["onnx", "onnx-int8"]
    with pytest.raises(ValueError, match=r"unknown format \['int4'\]; allowed: .*onnx, onnx-int8, onnx-fp16"):
        parse_formats("onnx,int4")


def test_int8_needs_data_and_says_so(source):
    with pytest.raises(ValueError, match="format onnx-int8 needs data=<the preprocess out_dir>"):
        export_step(source, "onnx-int8")


def test_int8_file_is_qdq_per_channel_with_first_and_last_conv_in_fp32(trained, tiny_data, tmp_path):
    model, classes = load_model(str(trained))
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32)
    images = [item.image for item in load_images(str(tiny_data), "split01", "train", classes, limit=2)]
    int8 = onnx.load(str(quantize_int8(fp32, images, tmp_path / "int8.onnx", default_int8_exclusions(fp32))))
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    producers = {out: n for n in int8.graph.node for out in n.output}
    weights = {c.name: producers.get(c.input[1]) for c in convs}
    first, last = conv_names(fp32)[0], conv_names(fp32)[-1]
    assert weights[first] is None and weights[last] is None  # fp32 weights, straight from an initializer
    quantized = [name for name, dq in weights.items() if dq is not None]
    assert len(quantized) == len(convs) - 2
    dq = weights[quantized[0]]
    assert dq.op_type == "DequantizeLinear" and any(a.name == "axis" for a in dq.attribute)  # one scale per channel
    initializers = {i.name: i for i in int8.graph.initializer}
    assert initializers[dq.input[0]].data_type == onnx.TensorProto.INT8
    # 7-bit weights: CPUs without VNNI multiply uint8 x int8 pairs into saturating int16 sums (255 x 127 x 2 does
    # not fit); on a 2-core AVX2 machine full-range weights cost the tiny model 0.77 mIoU points.
    for name in quantized:
        weight = onnx.numpy_helper.to_array(initializers[weights[name].input[0]])
        assert np.abs(weight.astype(np.int32)).max() <= 64, name
    assert [o.name for o in int8.graph.output] == ["logits", "class_ids"]


def test_fp16_file_keeps_fp32_input_and_outputs(trained, tmp_path):
    model, _ = load_model(str(trained))
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32)
    half = onnx.load(str(convert_fp16(fp32, tmp_path / "fp16.onnx")))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    conv_weight = {i.name: i for i in half.graph.initializer}[
        next(n for n in half.graph.node if n.op_type == "Conv").input[1]
    ]
    assert conv_weight.data_type == onnx.TensorProto.FLOAT16
    assert fp32.stat().st_size > 1.8 * (tmp_path / "fp16.onnx").stat().st_size


def test_every_format_is_scored_gated_and_registered_as_a_companion(exported):
    table = {row["format"]: row for row in exported["table"]}
    assert list(table) == ["pytorch-fp32", "onnx", "onnx-int8", "onnx-fp16"]
    assert table["onnx"]["argmax agreement"] >= 0.999 and abs(table["onnx"]["mIoU delta (points)"]) <= 0.1
    assert table["onnx-int8"]["argmax agreement"] >= 0.95
    assert table["onnx-int8"]["mIoU delta (points)"] >= -0.5  # the default gate
    assert table["onnx-int8"]["size MB"] < 0.35 * table["onnx"]["size MB"]
    assert table["onnx-int8"]["ms 64x128"] > 0 and table["onnx-fp16"]["ms 64x128"] is None
    assert "not a CPU format" in table["onnx-fp16"]["note"]
    client = MlflowClient()
    for fmt, name in (("onnx", "tiny-onnx"), ("onnx-int8", "tiny-onnx-int8"), ("onnx-fp16", "tiny-onnx-fp16")):
        version = client.get_model_version(name, exported["formats"][fmt]["registered_version"])
        assert version.tags["format"] == fmt and version.tags["source_model_version"] == "1"
        assert float(version.tags["export/mIoU"]) == pytest.approx(table[fmt]["mIoU"], abs=1e-5)
        rows = [line for line in version.description.splitlines() if line.startswith("| ")]
        assert [r.split(" | ")[0].strip("|* ") for r in rows] == ["format", *table]  # the whole table, every format
        assert f"| **{fmt}** | **{100 * table[fmt]['mIoU']:.2f}** |" in version.description  # its own row in bold
        assert client.get_model_version_by_alias(name, "production").version == version.version
    run = client.get_run(client.get_model_version("tiny-onnx-int8", "1").run_id)
    logged = pd.DataFrame(mlflow.load_table("export/formats.json", run_ids=[run.info.run_id]))
    assert list(logged["format"]) == list(table)


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8", "onnx-fp16"])
def test_each_format_serves_masks_of_the_input_size(exported, fmt, tmp_path):
    local = mlflow.artifacts.download_artifacts(exported["formats"][fmt]["model_uri"], dst_path=str(tmp_path))
    package = Path(local) / "artifacts" / "package"
    predictor, _ = load_predictor(package)
    assert predictor.backend == "onnxruntime"
    served = SegmentationModel().setup(package)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    out = served.predict(None, pd.DataFrame({"image": [encode_image(image)]}))
    assert (out["height"][0], out["width"][0]) == (70, 90)
    assert mlflow.models.Model.load(local).metadata["format"] == fmt


def test_the_gate_refuses_int8_calibrated_on_black_images(source, tiny_data, tmp_path):
    data = tmp_path / "black"
    shutil.copytree(tiny_data, data)
    table = pd.read_parquet(data / "split" / "split01.parquet")
    for relative in table[table["split"] == "train"]["image"]:  # calibration sees only zeros: every range collapses
        image = cv2.imread(str(data / relative))
        cv2.imwrite(str(data / relative), np.zeros_like(image))
    with pytest.raises(
        FormatRefused, match=r"format onnx-int8: mIoU [\d.]+ is [\d.]+ points below PyTorch fp32"
    ) as info:
        export_step(source, "onnx,onnx-int8", registered_model="black-onnx", data=str(data), timing_sizes=TIMING)
    assert set(info.value.result["formats"]) == {"onnx"}  # fp32 ONNX passed and was registered
    client = MlflowClient()
    assert client.get_registered_model("black-onnx").name == "black-onnx"
    assert not client.search_registered_models("name = 'black-onnx-int8'")
    run = client.get_run(client.get_model_version("black-onnx", "1").run_id)
    assert "points below PyTorch fp32" in run.data.tags["export/refused/onnx-int8"]
    assert run.info.status == "FAILED"  # as the step's exit code 2 says


def test_int8_predictor_masks_agree_with_pytorch(trained, tiny_data, tmp_path):
    model, classes = load_model(str(trained))
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32)
    images = load_images(str(tiny_data), "split01", "train", classes)
    int8 = quantize_int8(fp32, [i.image for i in images], tmp_path / "int8.onnx", default_int8_exclusions(fp32))
    reference = Predictor(model, backend="eager")
    predictor = Predictor.from_onnx(int8)
    val = load_images(str(tiny_data), "split01", "val", classes)[0].image
    with torch.inference_mode():
        agree = (predictor.predict_mask(val) == reference.predict_mask(val)).mean()
    assert agree >= 0.95


def test_int8_quantizes_every_bias_even_ones_the_exporter_shared(tmp_path):
    """An untrained network's folded biases are all zeros; the exporter stores them once and passes them on through
    Identity nodes. Each must still become an int32 initializer, or ONNX Runtime runs that conv in fp32."""
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(FCHarDNet(num_classes=3).eval(), fp32)
    assert any(n.op_type == "Identity" for n in onnx.load(str(fp32)).graph.node)  # the sharing this test is about
    image = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    int8 = onnx.load(str(quantize_int8(fp32, [image], tmp_path / "int8.onnx")))
    producers = {out: n for n in int8.graph.node for out in n.output}
    initializers = {i.name: i for i in int8.graph.initializer}
    for conv in (n for n in int8.graph.node if n.op_type == "Conv"):
        bias = producers.get(conv.input[2])
        assert bias is not None and bias.op_type == "DequantizeLinear", f"{conv.name}: bias not quantized"
        assert initializers[bias.input[0]].data_type == onnx.TensorProto.INT32, conv.name
