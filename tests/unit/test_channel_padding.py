"""Zero-channel padding for ONNX Runtime's blocked convolutions: same function, aligned channels, and no padding of a
tensor whose readers it does not understand."""

import numpy as np
import onnx
import pytest
from conftest import random_bn_model
from onnx import TensorProto, helper, numpy_helper

from segmentation.inference.channel_padding import pad_channels
from segmentation.inference.onnx import create_session, export_onnx, inline_shared_initializers


@pytest.fixture(scope="module")
def hardnet_onnx() -> bytes:
    return export_onnx(random_bn_model(num_classes=19))


def padded(model_bytes: bytes, block: int = 8) -> tuple[onnx.ModelProto, int]:
    model = inline_shared_initializers(onnx.load_from_string(model_bytes))
    return model, pad_channels(model, block)


def conv_input_channels(model: onnx.ModelProto) -> list[int]:
    weights = {init.name: init.dims for init in model.graph.initializer}
    return [weights[node.input[1]][1] for node in model.graph.node if node.op_type == "Conv"]


def test_fc_hardnet_padded_to_8_computes_the_same_logits_and_class_ids(hardnet_onnx):
    x = np.random.default_rng(0).standard_normal((2, 3, 70, 133)).astype(np.float32)
    plain = create_session(hardnet_onnx, channel_block=0).run(None, {"image": x})
    padded_run = create_session(hardnet_onnx, channel_block=8).run(None, {"image": x})
    assert padded_run[0].shape == plain[0].shape == (2, 19, 70, 133)
    np.testing.assert_allclose(padded_run[0], plain[0], rtol=1e-4, atol=1e-4)
    assert (padded_run[1] == plain[1]).mean() >= 0.999


def test_every_convolution_of_fc_hardnet_reads_block_aligned_channels(hardnet_onnx):
    before = conv_input_channels(onnx.load_from_string(hardnet_onnx))
    model, count = padded(hardnet_onnx)
    after = conv_input_channels(model)
    assert sum(c % 8 != 0 and c >= 8 for c in before) > 30  # the harmonic widths: most reads are unaligned
    assert all(c % 8 == 0 or c < 8 for c in after), after  # ONNX Runtime's NCHWc condition for every conv
    assert count > 30
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 19  # the class scores are never padded


def test_padding_appends_zero_rows_after_the_real_output_channels(hardnet_onnx):
    model, _ = padded(hardnet_onnx)
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    padded_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1].startswith("channel_padding")]
    assert padded_convs
    for node in padded_convs:
        weight = weights[node.input[1]]
        nonzero_rows = np.abs(weight).reshape(weight.shape[0], -1).sum(1) > 0
        real = int(nonzero_rows.sum())
        assert not nonzero_rows[real:].any(), f"{node.name}: zero rows must follow the real ones"
        assert weight.shape[0] - real < 8 or weight.shape[0] == real


def small_graph(reader: onnx.NodeProto | None, extra_outputs: list) -> onnx.ModelProto:
    """image (1x3xHxW) -> Conv(10) -> Relu -> [reader] ; Relu -> Conv(4, 1x1) -> out."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 10, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1, np.int64), "index"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["out"]),
    ]
    if reader is not None:
        nodes.append(reader)
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None), *extra_outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(2).standard_normal((1, 3, 9, 11)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {"image": x})


def test_a_tensor_only_convolutions_read_is_padded_and_the_output_is_unchanged():
    model = small_graph(None, [])
    expected = run(model, ["out"])
    assert pad_channels(model, 8) == 1
    weights = {init.name: init.dims for init in model.graph.initializer}
    assert [list(weights[n.input[1]])[:2] for n in model.graph.node if n.op_type == "Conv"] == [[16, 3], [4, 16]]
    np.testing.assert_allclose(run(model, ["out"])[0], expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "reader, why",
    [
        (helper.make_node("ReduceMean", ["r1"], ["extra"], keepdims=1), "a reduction over channels"),
        (helper.make_node("Identity", ["r1"], ["extra"]), "a graph output"),
        (helper.make_node("Shape", ["r1"], ["shape"]), "its shape as a graph output"),
    ],
)
def test_a_tensor_read_by_an_op_the_pass_does_not_understand_is_not_padded(reader, why):
    name = reader.output[0]
    extra = [helper.make_tensor_value_info(name, TensorProto.INT64 if name == "shape" else TensorProto.FLOAT, None)]
    model = small_graph(reader, extra)
    expected = run(model, ["out", name])
    assert pad_channels(model, 8) == 0, why
    for got, want in zip(run(model, ["out", name]), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_shape_read_of_the_channel_count_prevents_padding_but_height_does_not():
    for index, padded_count in ((1, 0), (2, 1)):
        reader = helper.make_node("Gather", ["shape", "index_value"], ["dim"], axis=0)
        model = small_graph(None, [helper.make_tensor_value_info("dim", TensorProto.INT64, None)])
        model.graph.initializer.append(numpy_helper.from_array(np.array(index, np.int64), "index_value"))
        model.graph.node.extend([helper.make_node("Shape", ["r1"], ["shape"]), reader])
        expected = run(model, ["out", "dim"])
        assert pad_channels(model, 8) == padded_count, f"Gather of dim {index}"
        got = run(model, ["out", "dim"])
        assert got[1] == expected[1]
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_float16_and_grouped_convolutions_are_left_alone():
    model = small_graph(None, [])
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        if init.name in ("w1", "b1"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    assert pad_channels(half, 8) == 0
    grouped = small_graph(None, [])
    grouped.graph.node[0].attribute.append(helper.make_attribute("group", 1))
    assert pad_channels(grouped, 8) == 1  # group=1 spelled out is still a plain convolution
    depthwise = small_graph(None, [])
    depthwise.graph.node[2].attribute.append(helper.make_attribute("group", 2))  # its reader is grouped
    assert pad_channels(depthwise, 8) == 0


def test_block_below_two_changes_nothing(hardnet_onnx):
    model = onnx.load_from_string(hardnet_onnx)
    assert pad_channels(model, 0) == 0 and pad_channels(model, 1) == 0
    assert model.SerializeToString() == onnx.load_from_string(hardnet_onnx).SerializeToString()
