"""The two outputs of every graph this project exports, ``logits`` and ``class_ids``, and graphs with one of them.

``class_ids`` is an ArgMax over the class axis cast to uint8, appended to the network (:func:`add_class_ids`).
Class ids from the runtime keep the ``C`` float planes inside it: at 1024x2048 ONNX Runtime's ArgMax takes ~70 ms
where ``torch.argmax`` over the ``(1, C, H, W)`` logits took ~0.8 s on a 2-core CPU. ONNX ArgMax picks the first of
tied maxima, as ``torch.argmax`` does. ONNX Runtime runs every node of a session whatever outputs a run asks for,
so the Predictor runs one session per output (:func:`one_output_graph`): masks without the full-size logits, logits
without the ArgMax.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

OUTPUT_NAME = "logits"
CLASS_IDS_NAME = "class_ids"
MAX_CLASS_IDS = 256  # class ids travel as uint8

_CHANNEL_KEEPING = {"Resize", "Upsample", "Identity", "Relu", "QuantizeLinear", "DequantizeLinear", "Cast"}


def num_classes(graph: onnx.GraphProto) -> int | None:
    """Channels of the ``logits`` output: its declared dim, else the output channels of the Conv that produces it
    (through resizes and (de)quantization); ``None`` when neither is known."""
    output = next((o for o in graph.output if o.name == OUTPUT_NAME), None)
    dims = output.type.tensor_type.shape.dim if output is not None else []
    if len(dims) == 4 and dims[1].dim_value:
        return dims[1].dim_value
    producers = {name: node for node in graph.node for name in node.output}
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    node = producers.get(OUTPUT_NAME)
    while node is not None and node.op_type in _CHANNEL_KEEPING:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Conv":
        return None
    weight = node.input[1]
    while weight in producers and producers[weight].op_type in _CHANNEL_KEEPING:  # QDQ: weights pass through a DQ
        weight = producers[weight].input[0]
    return shapes[weight][0] if weight in shapes else None


def add_class_ids(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append ``class_ids = Cast<uint8>(ArgMax(logits, axis=1))`` as a second output, in place; returns ``model``.

    A graph that already has the output, or whose ``logits`` have more than :data:`MAX_CLASS_IDS` or an unknown
    number of classes, is returned unchanged (the Predictor then takes the argmax of the logits itself).

    Shape:
        ``logits (N, C, H, W)`` float -> ``class_ids (N, H, W)`` uint8.
    """
    graph = model.graph
    outputs = {output.name: output for output in graph.output}
    if CLASS_IDS_NAME in outputs or OUTPUT_NAME not in outputs:
        return model
    dims = outputs[OUTPUT_NAME].type.tensor_type.shape.dim
    if len(dims) != 4 or not 0 < (num_classes(graph) or 0) <= MAX_CLASS_IDS:
        return model
    argmax = f"{CLASS_IDS_NAME}_int64"
    graph.node.extend(
        [
            helper.make_node("ArgMax", [OUTPUT_NAME], [argmax], name="ClassIdsArgMax", axis=1, keepdims=0),
            helper.make_node("Cast", [argmax], [CLASS_IDS_NAME], name="ClassIdsCast", to=TensorProto.UINT8),
        ]
    )
    shape = [dim.dim_param or dim.dim_value or None for i, dim in enumerate(dims) if i != 1]
    graph.output.append(helper.make_tensor_value_info(CLASS_IDS_NAME, TensorProto.UINT8, shape))
    return model


_NHWC = [0, 2, 3, 1]  # NCHW -> NHWC, and the order of a Resize's per-axis scales or sizes after it


def one_output_graph(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """A copy of a graph with ``output`` (``logits`` or ``class_ids``) as its only output, without the nodes only
    the other one needs: ONNX Runtime runs every node of a session whatever outputs a run asks for, so a session
    that serves masks would compute the full-size logits, and one that serves logits the class-id ArgMax.

    For ``class_ids``, when they are an ArgMax over the class axis of 4-D ``logits`` that come from a linear
    ``Resize`` to sizes given as a tensor (FC-HarDNet's final upsampling to the input's size), they are computed
    channels-last from that Resize's input (:func:`_channels_last_head`): the same interpolation of the same values,
    and ONNX Runtime's channels-last bilinear kernel gives the same scores bit for bit as its NCHW one (the test suite
    checks the class ids against the argmax of the logits for each coordinate mode, with ties and near-ties), while
    it and an ArgMax over contiguous scores took 11 ms where the NCHW pair took 22-24 ms (19 classes at 512x1024,
    2-core AMD EPYC). A Resize by constant scales is left alone: after a convolution ONNX Runtime runs it with its
    blocked (NCHWc) kernel, which rounds differently. Any other graph keeps its own class-id nodes, and a graph with
    subgraphs (If, Loop, Scan), whose nodes may read names they do not list as inputs, keeps all its nodes.

    Raises:
        ValueError: the graph has no such output.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    if not any(o.name == output for o in graph.output):
        raise ValueError(f"the graph has no {output!r} output (outputs: {[o.name for o in graph.output]})")
    flat = not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
    )
    head = _channels_last_head(graph) if output == CLASS_IDS_NAME and flat else []
    if head:  # ... -> ArgMax -> Cast becomes ... -> channels-last head -> the same Cast, in topological order
        replaced = set(head[-1].output) | {CLASS_IDS_NAME}
        cast = next(node for node in graph.node if CLASS_IDS_NAME in node.output)
        nodes = [node for node in graph.node if not set(node.output) & replaced]
        del graph.node[:]
        graph.node.extend([*nodes, *head, cast])
    kept = [o for o in graph.output if o.name == output]
    del graph.output[:]
    graph.output.extend(kept)
    if flat:
        _drop_unused(graph)
    return copy


def _channels_last_head(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes that compute the ArgMax feeding ``class_ids`` channels-last from the input of the Resize producing
    ``logits``; empty unless that ArgMax is one over axis 1 (first of tied maxima) of declared 4-D ``logits``, and
    the Resize a linear one to a ``sizes`` tensor (ONNX opset >= 11 form; ``scales`` unnamed or empty; no ``axes``,
    antialiasing, aspect-ratio policy or crop region), which therefore upsamples height and width alone."""
    producers = {name: node for node in graph.node for name in node.output}
    cast = producers.get(CLASS_IDS_NAME)
    argmax = producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    if argmax is None or argmax.op_type != "ArgMax" or list(argmax.input) != [OUTPUT_NAME]:
        return []
    attrs = {a.name: helper.get_attribute_value(a) for a in argmax.attribute}
    if attrs.get("axis") != 1 or attrs.get("keepdims", 1) != 0 or attrs.get("select_last_index", 0):
        return []
    logits = next(o for o in graph.output if o.name == OUTPUT_NAME)
    resize = producers.get(OUTPUT_NAME)
    if (
        len(logits.type.tensor_type.shape.dim) != 4
        or resize is None
        or resize.op_type != "Resize"
        or resize.domain not in ("", "ai.onnx")
        or len(resize.input) != 4
        or not resize.input[3]
        or (resize.input[2] and not _is_empty_constant(graph, resize.input[2], producers))
    ):
        return []
    attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
    plain = (
        attrs.get("mode") == b"linear"
        and attrs.get("coordinate_transformation_mode", b"half_pixel") != b"tf_crop_and_resize"
        and not attrs.get("antialias", 0)
        and "axes" not in attrs
        and attrs.get("keep_aspect_ratio_policy", b"stretch") == b"stretch"
    )
    if not plain:
        return []
    perm, moved, sizes, scores = (f"{CLASS_IDS_NAME}_{part}" for part in ("perm", "nhwc", "sizes", "scores"))
    # roi (required before opset 13) and the empty scales pass through: roi is read only by tf_crop_and_resize
    upsample = helper.make_node("Resize", [moved, *resize.input[1:3], sizes], [scores], name="ClassIdsResize")
    upsample.attribute.extend(resize.attribute)  # the same interpolation, on the moved axes
    return [
        helper.make_node("Constant", [], [perm], name="ClassIdsPerm", value_ints=_NHWC),
        helper.make_node("Gather", [resize.input[3], perm], [sizes], name="ClassIdsSizes", axis=0),
        helper.make_node("Transpose", [resize.input[0]], [moved], name="ClassIdsTranspose", perm=_NHWC),
        upsample,
        helper.make_node("ArgMax", [scores], list(argmax.output), name="ClassIdsArgMax", axis=3, keepdims=0),
    ]


def _is_empty_constant(graph: onnx.GraphProto, name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is an initializer or a ``Constant`` node's output with no elements (opset 11-12 exporters
    name an empty ``scales`` when they give ``sizes``)."""
    tensor = next((init for init in graph.initializer if init.name == name), None)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant":
        tensor = next((a.t for a in node.attribute if a.name == "value"), None)
    return tensor is not None and 0 in tensor.dims


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove, in place, the nodes and initializers that no graph output needs (ONNX Runtime would run them)."""
    needed = {output.name for output in graph.output}
    keep = []
    for node in reversed(graph.node):
        if needed & set(node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inputs = {value.name for value in graph.input}  # an initializer that is also an input stays: its default value
    initializers = [init for init in graph.initializer if init.name in needed or init.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def output_names(onnx_model: bytes) -> list[str]:
    """The outputs a serialized model will have in a session of every output (``create_session`` without ``only``):
    its own, with ``class_ids`` added where :func:`add_class_ids` can add it."""
    return [output.name for output in add_class_ids(onnx.load_from_string(onnx_model)).graph.output]
