"""Zero-channel padding for ONNX Runtime's blocked convolutions: same function, aligned channels, and no padding of a
tensor whose readers it does not understand."""

import numpy as np
import onnx
import pytest
from conftest import random_bn_model
from onnx import TensorProto, helper, numpy_helper

from segmentation.inference.channel_padding import BLOCK_ENV, configured_block, pad_channels, padding_block
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


@pytest.mark.parametrize("block", [8, 16])
def test_fc_hardnet_padded_to_a_block_computes_the_same_logits_and_class_ids(hardnet_onnx, block):
    x = np.random.default_rng(0).standard_normal((2, 3, 70, 133)).astype(np.float32)
    plain = create_session(hardnet_onnx, channel_block=0).run(None, {"image": x})
    padded_run = create_session(hardnet_onnx, channel_block=block).run(None, {"image": x})
    assert padded_run[0].shape == plain[0].shape == (2, 19, 70, 133)
    np.testing.assert_allclose(padded_run[0], plain[0], rtol=1e-4, atol=1e-4)
    assert (padded_run[1] == plain[1]).mean() >= 0.999


@pytest.mark.parametrize("block", [8, 16])
def test_every_convolution_of_fc_hardnet_reads_block_aligned_channels(hardnet_onnx, block):
    before = conv_input_channels(onnx.load_from_string(hardnet_onnx))
    model, count = padded(hardnet_onnx, block)
    after = conv_input_channels(model)
    assert sum(c % block != 0 for c in before) > 30  # the harmonic widths: most reads are unaligned
    # ONNX Runtime's NCHWc condition for every conv; only the image (3 channels) may be read unblocked.
    assert all(c % block == 0 or c == 3 for c in after), after
    assert count > 30
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 19  # the class scores are never padded


@pytest.mark.parametrize(
    ("flags", "block"),
    [
        ({"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, 16),  # AVX-512 with AMX: 16-float blocks
        ({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"}, 16),  # AVX-512 without AMX (AMD Zen 4 and 5)
        ({"avx512f"}, 16),  # the block is the vector width: AVX-512 decides, whatever else is listed
        ({"avx2", "fma", "avx_vnni"}, 8),  # AVX2 only: 8-float blocks
        ({"avx2"}, 0),  # no FMA: ONNX Runtime has no AVX2 kernels for it
        ({"avx", "sse4_2"}, 0),
        (set(), 0),  # flags unreadable (not Linux, not x86): leave the graph alone
    ],
)
def test_the_padding_block_follows_the_cpus_vector_units(flags, block):
    assert padding_block(frozenset(flags)) == block


@pytest.mark.parametrize(
    ("flags", "block"),
    [
        ({"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"}, 8),  # AVX-512 VNNI: measured on AMD Zen 4 and 5
        ({"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, 0),  # AMX runs INT8 in other kernels
        ({"avx2", "fma", "avx512f"}, 0),  # AVX-512 without VNNI
        ({"avx2", "fma", "avx_vnni"}, 0),  # AVX2 (with or without AVX-VNNI): not measured
        (set(), 0),
    ],
)
def test_int8_graphs_are_padded_only_on_the_cpus_where_it_was_measured_to_pay(flags, block):
    assert padding_block(frozenset(flags), quantized=True) == block


def test_the_environment_variable_pads_int8_graphs_too(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "8")
    assert configured_block(quantized=True) == 8


@pytest.mark.parametrize("value", ["0", "8", "16", " 16 "])
def test_the_environment_variable_overrides_the_cpus_block(monkeypatch, value):
    monkeypatch.setenv(BLOCK_ENV, value)
    assert configured_block() == int(value)


def test_without_the_environment_variable_the_cpu_decides(monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    assert configured_block() == padding_block()


@pytest.mark.parametrize("value", ["4", "sixteen", "-8", "16.0"])
def test_a_block_that_is_not_an_onnx_runtime_block_is_refused_by_name(monkeypatch, hardnet_onnx, value):
    monkeypatch.setenv(BLOCK_ENV, value)
    with pytest.raises(ValueError, match=rf"{BLOCK_ENV}='{value}': expected 0 \(no padding\), 8 .* or 16"):
        create_session(hardnet_onnx)


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
        (helper.make_node("Identity", ["r1"], ["extra"]), "an op the pass does not know"),
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


def test_a_tensor_that_is_a_graph_output_is_not_padded():
    model = small_graph(None, [helper.make_tensor_value_info("r1", TensorProto.FLOAT, None)])
    expected = run(model, ["out", "r1"])
    assert pad_channels(model, 8) == 0
    assert run(model, ["out", "r1"])[1].shape == expected[1].shape == (1, 10, 9, 11)


def conv_graph(nodes: list, inits: dict, outputs: list[str], inputs: tuple = ()) -> onnx.ModelProto:
    """A graph on ``image`` (1x3xHxW) from nodes and named numpy initializers; ``inputs`` are extra graph inputs."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(inits[name].shape)) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def same_output_after_padding(model: onnx.ModelProto, expected_count: int) -> None:
    before = run(model, [o.name for o in model.graph.output])
    assert pad_channels(model, 8) == expected_count
    after = run(model, [o.name for o in model.graph.output])
    for got, want in zip(after, before, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_concatenated_padded_tensors_are_read_with_zero_weights_at_each_gap():
    """Two convolutions (10 and 6 channels) padded to 16 and 8, concatenated to 24, read by a 1x1 convolution."""
    inits = {"wa": weights(10, 3, 3, 3), "wb": weights(6, 3, 1, 1), "wc": weights(5, 16, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["image", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["image", "wb"], ["b"]),
        helper.make_node("MaxPool", ["b"], ["pb"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ra", "pb"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["out"]),
    ]
    model = conv_graph(nodes, inits, ["out"])
    same_output_after_padding(model, 2)
    reader = next(n for n in model.graph.node if n.output[0] == "out")
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == reader.input[1]))
    assert weight.shape == (5, 24, 1, 1)
    assert not weight[:, 10:16].any() and not weight[:, 22:24].any()  # the gaps after each part


@pytest.mark.parametrize(
    "sizes, scales, padded_count",
    [
        (None, [1.0, 1.0, 2.0, 2.0], 1),  # constant scales of 1 on channels: the channels follow the input
        ([1, 10, 18, 22], None, 0),  # constant sizes spell out the 10 channels: padding would contradict them
        (None, [1.0, 2.0, 2.0, 2.0], 0),  # a resize across channels (not valid for Resize's linear mode anyway)
    ],
)
def test_resize_passes_padding_only_when_it_keeps_the_channel_count(sizes, scales, padded_count):
    inits = {"w1": weights(10, 3, 3, 3), "w2": weights(4, 10, 1, 1)}
    if sizes is not None:
        inits["sizes"] = np.array(sizes, np.int64)
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
    resize_inputs = ["c1", "", "scales"] if scales is not None else ["c1", "", "", "sizes"]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", resize_inputs, ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "w2"], ["out"]),
    ]
    model = conv_graph(nodes, {k: v for k, v in inits.items()}, ["out"])
    if scales is not None and scales[1] != 1.0:
        assert pad_channels(model, 8) == padded_count
        return
    same_output_after_padding(model, padded_count)


def test_maxpool_indices_count_channels_so_they_prevent_padding():
    inits = {"w1": weights(10, 3, 3, 3), "w2": weights(4, 10, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c1"], ["pool", "indices"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool", "w2"], ["out"]),
    ]
    model = conv_graph(nodes, inits, ["out"])
    model.graph.output.append(helper.make_tensor_value_info("indices", TensorProto.INT64, None))
    same_output_after_padding(model, 0)


def test_a_graph_with_subgraphs_is_left_alone():
    inits = {"w1": weights(10, 3, 3, 3), "w2": weights(4, 10, 1, 1)}
    branch = helper.make_graph(
        [helper.make_node("ReduceMean", ["c1"], ["mean"], keepdims=1)],
        "branch",
        [],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["out"]),
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["cond"], ["branch_out"], then_branch=branch, else_branch=branch),
    ]
    model = conv_graph(nodes, inits, ["out", "branch_out"])
    original = model.SerializeToString()
    same_output_after_padding(model, 0)
    assert model.SerializeToString() == original


def test_weights_a_caller_can_feed_are_not_rewritten_and_new_names_never_collide():
    inits = {"w1": weights(10, 3, 3, 3), "w2": weights(4, 10, 1, 1), "channel_padding_0": weights(2, 2)}
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["out"]),
        helper.make_node("Identity", ["channel_padding_0"], ["taken"]),
    ]
    overridable = conv_graph(nodes, inits, ["out", "taken"], inputs=("w2",))
    same_output_after_padding(overridable, 0)  # w2 is a graph input: padding c1 would need a rewritten w2
    model = conv_graph(nodes, inits, ["out", "taken"])
    same_output_after_padding(model, 1)
    names = [init.name for init in model.graph.initializer]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def hardnet_int8(hardnet_onnx, tmp_path_factory) -> bytes:
    from segmentation.data.synthetic import generate_scene
    from segmentation.inference.quantize import default_int8_exclusions, quantize_int8

    path = tmp_path_factory.mktemp("int8") / "int8.onnx"
    scenes = [generate_scene(64, 128, seed)[0] for seed in range(2)]
    return quantize_int8(hardnet_onnx, scenes, path, default_int8_exclusions(hardnet_onnx)).read_bytes()


def quantized_conv_input_channels(model: onnx.ModelProto) -> list[int]:
    weights = {init.name: init.dims for init in model.graph.initializer}
    producers = {name: node for node in model.graph.node for name in node.output}
    channels = []
    for node in model.graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "Conv" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            channels.append(weights[dq.input[0]][1])
    return channels


def fused_integer_convolutions(model: onnx.ModelProto, tmp_path) -> int:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # its warning that an NCHWc-optimised file is CPU-specific is expected
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sum(node.op_type == "QLinearConv" for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("block", [8, 16])
def test_an_int8_graph_padded_to_a_block_gives_the_same_integers_and_keeps_its_integer_kernels(
    hardnet_int8, block, tmp_path
):
    model, count = padded(hardnet_int8, block)
    before = quantized_conv_input_channels(onnx.load_from_string(hardnet_int8))
    after = quantized_conv_input_channels(model)
    assert count > 30 and sum(c % block != 0 for c in before) > 30
    assert all(c % block == 0 for c in after), after
    # ONNX Runtime runs a quantized convolution in its integer kernel only when its bias scale is input scale x weight
    # scale for every channel, the padded ones included: else it falls back to fp32 between (de)quantize nodes.
    assert fused_integer_convolutions(model, tmp_path) == fused_integer_convolutions(
        onnx.load_from_string(hardnet_int8), tmp_path
    )
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 96), dtype=np.float32)
    expected = create_session(hardnet_int8, channel_block=0).run(None, {"image": x})
    got = create_session(hardnet_int8, channel_block=block).run(None, {"image": x})
    # Zero channels add nothing to the integer sums, so the outputs are the same numbers, not merely close ones.
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def quantized_graph(weights: str) -> onnx.ModelProto:
    """image -> Q/DQ -> Conv(6, weights quantized as ``weights`` says) -> Q/DQ -> Conv(4, int8 per channel) -> out.

    ``weights``: ``per-tensor-uint8`` (zero point 128) or ``per-channel-int8`` (no zero-point input)."""
    rng = np.random.default_rng(3)
    first = rng.integers(0, 256, (6, 3, 3, 3)).astype(np.uint8 if weights == "per-tensor-uint8" else np.int8)
    inits = {
        "s": np.array(0.05, np.float32),
        "z": np.array(128, np.uint8),
        "w1": first if weights == "per-tensor-uint8" else (first.astype(np.int16) - 128).astype(np.int8),
        "w2": rng.integers(-60, 60, (4, 6, 1, 1)).astype(np.int8),
        "w2_s": np.full(4, 0.02, np.float32),
        "w2_z": np.zeros(4, np.int8),
    }
    if weights == "per-tensor-uint8":
        inits |= {"w1_s": np.array(0.01, np.float32), "w1_z": np.array(128, np.uint8)}
        w1_dq = helper.make_node("DequantizeLinear", ["w1", "w1_s", "w1_z"], ["w1_f"])
    else:
        inits |= {"w1_s": np.linspace(0.005, 0.02, 6).astype(np.float32)}
        w1_dq = helper.make_node("DequantizeLinear", ["w1", "w1_s"], ["w1_f"], axis=0)
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
        w1_dq,
        helper.make_node("Conv", ["x", "w1_f"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c1", "s", "z"], ["c1q"]),
        helper.make_node("DequantizeLinear", ["c1q", "s", "z"], ["c1d"]),
        helper.make_node("DequantizeLinear", ["w2", "w2_s", "w2_z"], ["w2_f"], axis=0),
        helper.make_node("Conv", ["c1d", "w2_f"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "quantized",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("weights", ["per-tensor-uint8", "per-channel-int8"])
def test_quantized_weights_of_either_kind_are_padded_with_what_dequantizes_to_zero(weights):
    model = quantized_graph(weights)
    expected = run(model, ["out"])
    assert pad_channels(model, 8) == 1
    producers = {node.output[0]: node for node in model.graph.node}
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    first, second = (producers[n.input[1]] for n in model.graph.node if n.op_type == "Conv")
    assert values[first.input[0]].shape[0] == 8 and values[second.input[0]].shape[1] == 8
    # The two new output channels of the first convolution and the second one's two new input channels hold the
    # value that dequantizes to 0: the zero point (128 for uint8 per tensor, 0 when there is no zero-point input).
    zero = 128 if weights == "per-tensor-uint8" else 0
    assert (values[first.input[0]][6:] == zero).all() and (values[second.input[0]][:, 6:] == 0).all()
    np.testing.assert_allclose(run(model, ["out"])[0], expected[0], rtol=1e-6, atol=1e-6)


def test_per_block_quantized_weights_are_left_alone_even_with_a_single_scale():
    # One output channel, a 1x1 kernel and two input channels in one block: the blocked scale holds one number but
    # is 4-D, and padding the weights to 8 rows would leave it the wrong shape for ONNX Runtime at run time.
    inits = [
        numpy_helper.from_array(np.array([[[[3]], [[-2]]]], np.int8), "w1"),
        numpy_helper.from_array(np.full((1, 1, 1, 1), 0.1, np.float32), "w1_s"),
        numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w1", "w1_s"], ["w1_f"], axis=1, block_size=2),
        helper.make_node("Conv", ["image", "w1_f"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "blocked",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert pad_channels(model, 8) == 0
