"""Model packages, load_model from every kind of reference, ONNX export parity, and the export step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import random_bn_model
from safetensors.torch import save_file

from segmentation.config import ModelConfig
from segmentation.data.classes import ClassInfo
from segmentation.inference.onnx import CLASS_IDS_NAME, add_class_ids, create_session, export_onnx, one_output_graph
from segmentation.inference.parity import ParityError, verify_onnx
from segmentation.inference.predictor import Predictor
from segmentation.mlops.model_store import load_model
from segmentation.models import FCHarDNet
from segmentation.models.package import load_model_package, save_model_package
from segmentation.models.preprocessing import to_input_tensor

CLASSES = ClassInfo(("road", "car", "sky"), ((128, 64, 128), (0, 0, 142), (70, 130, 180)))
CFG = ModelConfig(num_classes=3)
SIZES = ((64, 128), (96, 160), (70, 90))


@pytest.fixture(scope="module")
def model() -> FCHarDNet:
    return random_bn_model(num_classes=3)  # BN statistics far from (0, 1): fusing is a real transformation


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, opset=17, fuse_bn=True)
    return path


def _same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_package_round_trip(model, tmp_path):
    directory = save_model_package(model, CLASSES, CFG, tmp_path / "pkg")
    meta = json.loads((directory / "model.json").read_text())
    assert meta["arch"] == "fchardnet70" and meta["num_classes"] == 3
    assert meta["preprocessing"] == "bgr_imagenet_v1" and meta["backend"] == "pytorch"
    assert ClassInfo.from_dict(meta["classes"]) == CLASSES
    loaded, classes = load_model_package(directory)
    assert classes == CLASSES and not loaded.training
    _same_function(model, loaded)


def test_package_refuses_mismatched_classes(model, tmp_path):
    with pytest.raises(ValueError, match="3 names but model.num_classes is 19"):
        save_model_package(model, CLASSES, ModelConfig(num_classes=19), tmp_path)


def test_onnx_has_dynamic_axes_and_fused_batchnorm(onnx_file, model):
    graph = onnx.load(str(onnx_file)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)
    assert not model.training  # export works on a copy and leaves the caller's model as it was


def _logits_passthrough(num_classes: int) -> onnx.ModelProto:
    """A graph whose ``logits`` are its input, to feed the appended ArgMax any logits, ties included."""
    shape = ["batch", num_classes, "height", "width"]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])],
        "passthrough",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape)],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_in_graph_class_ids_equal_torch_argmax_with_ties():
    session = create_session(add_class_ids(_logits_passthrough(5)).SerializeToString())
    logits = torch.randint(0, 3, (2, 5, 33, 47)).float()  # integers in 0..2 over 5 classes: ties almost everywhere
    logits[0, :, 0, 0] = 1.0  # all five tied: both pick class 0
    logits[0, :, 0, 1] = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0])  # tie between 1, 3 and 4: both pick 1
    (ids,) = session.run([CLASS_IDS_NAME], {"image": logits.numpy()})
    assert ids.dtype == np.uint8 and ids.shape == (2, 33, 47)
    assert ids[0, 0, 0] == 0 and ids[0, 0, 1] == 1
    assert np.array_equal(ids, logits.argmax(1).numpy())


def test_exported_graph_outputs_logits_and_class_ids(onnx_file):
    graph = onnx.load(str(onnx_file)).graph
    assert [o.name for o in graph.output] == ["logits", "class_ids"]
    dims = [d.dim_param or d.dim_value for d in graph.output[1].type.tensor_type.shape.dim]
    assert (
        dims == ["batch", "height", "width"] and graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    )
    session = create_session(onnx_file)
    x = torch.randn(1, 3, 70, 90).numpy()
    logits, ids = session.run(["logits", "class_ids"], {"image": x})
    assert np.array_equal(ids, logits.argmax(1))


def test_class_ids_are_added_to_a_file_exported_without_them(onnx_file, tmp_path):
    old = onnx.load(str(onnx_file))  # what export wrote before class ids existed: the network alone
    del old.graph.node[-2:], old.graph.output[1]
    old.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "Resizelogits_dim_1"  # as the exporter leaves it
    onnx.save(old, str(tmp_path / "old.onnx"))
    predictor = Predictor.from_onnx(tmp_path / "old.onnx")
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    with_ids = Predictor.from_onnx(onnx_file).predict_mask(image)
    assert np.array_equal(predictor.predict_mask(image), with_ids)
    assert [o.name for o in predictor.session.get_outputs()] == ["logits"]  # the class-id ArgMax is not run there
    assert [o.name for o in predictor.ids_session.get_outputs()] == ["class_ids"]


def test_class_ids_session_of_fc_hardnet_skips_the_logits_and_equals_their_argmax():
    exported = export_onnx(random_bn_model(num_classes=19))
    graph = one_output_graph(onnx.load_from_string(exported), CLASS_IDS_NAME).graph
    assert [o.name for o in graph.output] == [CLASS_IDS_NAME]
    assert not any("logits" in node.output for node in graph.node)  # the NCHW upsampling to the logits is gone
    argmax = next(node for node in graph.node if node.op_type == "ArgMax")
    assert onnx.helper.get_attribute_value(argmax.attribute[0]) == 3  # ... computed channels-last
    logits_only = one_output_graph(onnx.load_from_string(exported), "logits").graph
    assert [o.name for o in logits_only.output] == ["logits"]
    assert not any(node.op_type in ("ArgMax", "Transpose") for node in logits_only.node)
    full, masks = create_session(exported), create_session(exported, only=CLASS_IDS_NAME)
    assert [o.name for o in masks.get_outputs()] == [CLASS_IDS_NAME]
    for height, width in ((64, 128), (70, 90), (97, 131)):
        x = torch.randn(1, 3, height, width).numpy()
        logits, ids = full.run(None, {"image": x})
        (only,) = masks.run(None, {"image": x})
        assert only.dtype == np.uint8 and np.array_equal(only, ids) and np.array_equal(only, logits.argmax(1))


def _resized_logits(
    mode: str, transform: str, by_scales: bool, conv: bool = False, opset: int = 17
) -> onnx.ModelProto:
    """``logits = Resize(x)`` to twice the size plus 3 x 5 pixels, computed from the input's shape as the network's
    final upsampling is (or by constant scales), of 5 classes; ``x`` is the input, or with ``conv`` a 1 x 1
    convolution of it whose five class scores are a few float steps apart (near-ties). Opset 11 graphs give roi and
    an empty scales tensor, as exporters of that opset do."""
    h = onnx.helper
    nodes, initializers, source = [], [], "image"
    if conv:
        base = np.random.default_rng(5).standard_normal((1, 5, 1, 1)).astype(np.float32)
        weights = np.concatenate([base * np.float32(1 + k * 1.2e-7) for k in range(5)]).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(weights, "weights"))
        nodes.append(h.make_node("Conv", ["image", "weights"], ["scores"]))
        source = "scores"
    empty = onnx.numpy_helper.from_array(np.zeros(0, np.float32))
    roi, no_scales = ("roi", "no_scales") if opset < 13 else ("", "")
    if opset < 13:
        nodes += [h.make_node("Constant", [], [name], value=empty) for name in (roi, no_scales)]
    if by_scales:
        nodes.append(h.make_node("Constant", [], ["scales"], value_floats=[1.0, 1.0, 2.0, 3.0]))
        inputs = [source, roi, "scales"]
    else:
        nodes += [
            h.make_node("Shape", [source], ["shape"]),
            h.make_node("Constant", [], ["twice"], value_ints=[1, 1, 2, 2]),
            h.make_node("Constant", [], ["more"], value_ints=[0, 0, 3, 5]),
            h.make_node("Mul", ["shape", "twice"], ["doubled"]),
            h.make_node("Add", ["doubled", "more"], ["sizes"]),
        ]
        inputs = [source, roi, no_scales, "sizes"]
    nodes.append(h.make_node("Resize", inputs, ["logits"], mode=mode, coordinate_transformation_mode=transform))
    graph = h.make_graph(
        nodes,
        "resize",
        [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 5, "h", "w"])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 5, "height", "width"])],
        initializer=initializers,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def _masks_equal_argmax(model: onnx.ModelProto, inputs, channel_block: int = 0) -> None:
    logits_session = create_session(model.SerializeToString(), channel_block=channel_block, only="logits")
    masks = create_session(model.SerializeToString(), channel_block=channel_block, only=CLASS_IDS_NAME)
    for x in inputs:
        logits = logits_session.run(None, {"image": x})[0]
        assert np.array_equal(masks.run(None, {"image": x})[0], logits.argmax(1))


def _channels_last(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "Transpose" for node in one_output_graph(model, CLASS_IDS_NAME).graph.node)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("transform", ["align_corners", "half_pixel", "pytorch_half_pixel", "asymmetric"])
def test_channels_last_class_ids_equal_the_argmax_for_every_linear_resize_to_sizes(transform, opset):
    model = add_class_ids(_resized_logits("linear", transform, by_scales=False, opset=opset))
    assert _channels_last(model)
    rng = np.random.default_rng(3)
    ties = rng.integers(0, 3, (2, 5, 13, 17)).astype(np.float32)  # small integers: ties between classes everywhere
    _masks_equal_argmax(model, [ties, rng.standard_normal((1, 5, 20, 9), np.float32)])


@pytest.mark.parametrize("by_scales", [False, True])
def test_class_ids_after_a_convolution_equal_the_argmax_with_near_ties(by_scales):
    # After a convolution, ONNX Runtime runs a Resize by constant scales with its blocked (NCHWc) kernel, which rounds
    # differently from its channels-last one: such a Resize keeps its own class-id nodes.
    model = add_class_ids(_resized_logits("linear", "half_pixel", by_scales=by_scales, conv=True))
    assert _channels_last(model) == (not by_scales)
    x = np.random.default_rng(1).standard_normal((1, 5, 64, 128)).astype(np.float32)
    _masks_equal_argmax(model, [x])


def test_one_output_graph_keeps_other_heads():
    cubic = add_class_ids(_resized_logits("cubic", "half_pixel", by_scales=False))
    graph = one_output_graph(cubic, CLASS_IDS_NAME).graph
    assert not any(node.op_type == "Transpose" for node in graph.node)  # not a linear resize: its ArgMax stays
    assert [o.name for o in graph.output] == [CLASS_IDS_NAME]
    five_d = add_class_ids(_resized_logits("linear", "half_pixel", by_scales=False))
    five_d.graph.output[0].type.tensor_type.shape.dim.add().dim_param = "depth"  # declared 5-D: not rewritten
    assert not _channels_last(five_d)
    last_of_ties = add_class_ids(_resized_logits("linear", "half_pixel", by_scales=False))
    next(n for n in last_of_ties.graph.node if n.op_type == "ArgMax").attribute.append(
        onnx.helper.make_attribute("select_last_index", 1)
    )
    assert not _channels_last(last_of_ties)  # the head picks the first of tied maxima only
    with pytest.raises(ValueError, match="no 'class_ids' output"):
        one_output_graph(_logits_passthrough(3), CLASS_IDS_NAME)


def test_one_output_graph_drops_what_the_output_does_not_need_but_keeps_graphs_with_subgraphs():
    model = add_class_ids(_resized_logits("linear", "half_pixel", by_scales=False, conv=True))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    masks = one_output_graph(model, CLASS_IDS_NAME).graph
    logits = one_output_graph(model, "logits").graph
    assert [i.name for i in masks.initializer] == ["weights"] == [i.name for i in logits.initializer]
    assert "logits" not in {name for node in masks.node for name in node.output}
    assert not {"ArgMax", "Cast"} & {node.op_type for node in logits.node}
    # A node with a subgraph may read names it does not list as inputs: such a graph keeps every node and its head.
    h = onnx.helper
    branch = h.make_graph(
        [h.make_node("Identity", ["image"], ["seen"])], "branch", [], [h.make_tensor_value_info("seen", 1, None)]
    )
    model.graph.node.extend(
        [
            h.make_node("Constant", [], ["yes"], value=onnx.numpy_helper.from_array(np.array(True))),
            h.make_node("If", ["yes"], ["dead"], then_branch=branch, else_branch=branch),
        ]
    )
    kept = one_output_graph(model, CLASS_IDS_NAME).graph
    assert len(kept.node) == len(model.graph.node) and not _channels_last(model)
    _masks_equal_argmax(model, [np.random.default_rng(4).standard_normal((1, 5, 16, 24)).astype(np.float32)])


class _CountingSession:
    """Forwards to an onnxruntime session and counts its runs: tells which path made a mask."""

    def __init__(self, session) -> None:
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def test_predict_mask_reads_the_class_ids_session_without_tta(tmp_path):
    onnx.save(add_class_ids(_logits_passthrough(3)), str(tmp_path / "ids.onnx"))
    predictor = Predictor.from_onnx(tmp_path / "ids.onnx")
    assert [o.name for o in predictor.session.get_outputs()] == ["logits"]
    assert [o.name for o in predictor.ids_session.get_outputs()] == [CLASS_IDS_NAME]
    predictor.ids_session = counting = _CountingSession(predictor.ids_session)
    image = np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8)  # padded to 64 rows inside
    logits = predictor.logits(torch.nn.functional.pad(to_input_tensor(image), (0, 0, 0, 24)))[0, :, :40]
    mask = predictor.predict_mask(image)
    assert counting.runs == 1 and mask.shape == (40, 70) and mask.flags.c_contiguous
    assert np.array_equal(mask, logits.argmax(0).numpy())  # the session's class ids, cropped to the image
    flipped = predictor.predict_mask(image, tta="flip")  # TTA averages logits: argmax taken in PyTorch
    windowed = predictor.predict_mask(image, sliding_window=64)  # 64 x 70 does not fit one 64 px window
    assert counting.runs == 1
    assert np.array_equal(flipped, logits.argmax(0).numpy()) and np.array_equal(windowed, logits.argmax(0).numpy())


def test_a_class_ids_session_that_disagrees_with_the_logits_is_not_used(tmp_path, caplog):
    marked = add_class_ids(_logits_passthrough(3))
    next(n for n in marked.graph.node if n.op_type == "ArgMax").op_type = "ArgMin"
    onnx.save(marked, str(tmp_path / "argmin.onnx"))
    with caplog.at_level("WARNING"):
        predictor = Predictor.from_onnx(tmp_path / "argmin.onnx")
    assert predictor.ids_session is None and "differ from the argmax of the logits" in caplog.text
    image = np.random.default_rng(2).integers(0, 256, (64, 70, 3), dtype=np.uint8)
    logits = predictor.logits(to_input_tensor(image))[0]
    assert np.array_equal(predictor.predict_mask(image), logits.argmax(0).numpy())


def test_unfused_export_matches_too(model, tmp_path):
    unfused = tmp_path / "unfused.onnx"
    export_onnx(model, unfused, fuse_bn=False)
    assert verify_onnx(model, unfused, SIZES[:1], batch_size=1)["max_abs_diff"] <= 1e-3


def test_onnx_matches_pytorch_at_several_sizes(onnx_file, model):
    result = verify_onnx(model, onnx_file, SIZES, batch_size=2)
    assert result["max_abs_diff"] <= 1e-3
    assert result["argmax_agreement"] >= 0.999


def test_parity_failure_raises_with_the_numbers(onnx_file, model):
    changed = FCHarDNet(num_classes=3).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.finalConv.bias[0] += 0.5  # the exported file no longer computes what this model computes
    message = (
        r"\(seed 7\): max\|diff\| 0\.5 \(allowed 0\.001\d* = 0\.001 \+ 1e-05 x max\|logit\| [\d.e+-]+\), "
        r"argmax agreement 0\.9"
    )
    with pytest.raises(ParityError, match=message) as info:
        verify_onnx(changed, onnx_file, SIZES[:1], seed=7)
    assert info.value.result["max_abs_diff"] == pytest.approx(0.5, abs=1e-3)


def test_load_model_from_a_training_checkpoint_folder(model, tmp_path):
    checkpoint = tmp_path / "out" / "checkpoints" / "step-0000004"
    checkpoint.mkdir(parents=True)
    save_file(
        {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / "model.safetensors")
    )
    CLASSES.write_csv(tmp_path / "out" / "classes.csv")
    loaded, classes = load_model(str(checkpoint))
    assert classes == CLASSES
    _same_function(model, loaded)


@pytest.mark.parametrize("kind", ["missing", "empty folder", "onnx only", "package deeper inside"])
def test_load_model_says_what_it_tried(kind, tmp_path, onnx_file, model):
    if kind == "missing":
        with pytest.raises(FileNotFoundError, match="no such file or folder.*models:/<name>@<alias>"):
            load_model(str(tmp_path / "nope"))
        return
    if kind == "package deeper inside":  # a parent folder (e.g. /tmp) must not be searched for any package
        save_model_package(model, CLASSES, CFG, tmp_path / "some" / "where")
    if kind == "onnx only":
        (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
        (tmp_path / "model.json").write_text(
            json.dumps({"arch": "fchardnet70", "num_classes": 3, "classes": CLASSES.to_dict(), "backend": "onnx"})
        )
    with pytest.raises(ValueError, match="is not a segmentation model. Tried: .*Accepted: runs:/"):
        load_model(str(tmp_path))
