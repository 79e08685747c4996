"""ONNX export of a segmentation network and the onnxruntime session that runs it, each written once.

Export, export verification, the :class:`~segmentation.inference.predictor.Predictor` and serving all use these two
functions, so the session that was verified is the session that serves.

Every graph has two outputs: ``logits`` and ``class_ids``, an ArgMax over the class axis cast to uint8 that is
appended to the network (:func:`add_class_ids`). Asking the session for ``class_ids`` alone keeps the ``C`` float
planes inside the runtime: at 1024x2048 ONNX Runtime's ArgMax takes ~70 ms where ``torch.argmax`` over the
``(1, C, H, W)`` logits took ~0.8 s on this CPU. ONNX ArgMax picks the first of tied maxima, as ``torch.argmax`` does.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from segmentation.inference.channel_padding import configured_block, pad_channels
from segmentation.io import atomic_path
from segmentation.models import fuse_bn as fold_batchnorm

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
CLASS_IDS_NAME = "class_ids"
MAX_CLASS_IDS = 256  # class ids travel as uint8
EXECUTION_PROVIDERS = ["CPUExecutionProvider"]
_DIMS = {0: "batch", 2: "height", 3: "width"}
_TRACE_SIZE = (64, 128)  # any size the network accepts: height and width are exported as dynamic axes


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


def inline_shared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Identity(initializer)`` nodes by copies of the initializer, in place; returns ``model``.

    The TorchScript exporter stores equal tensors once and hands them to later layers through Identity nodes (an
    untrained network's folded BatchNorm biases are all zeros, for instance). Graph passes that rewrite a
    convolution's weights or bias (channel padding, INT8 quantization) need them as the convolution's own
    initializers.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    fixed = {output.name for output in graph.output} | {value.name for value in graph.input}
    keep = []
    for node in graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in initializers
            and not {node.input[0], node.output[0]} & fixed
        ):
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def has_class_ids(session) -> bool:
    """Whether an onnxruntime session computes the ``class_ids`` output."""
    return any(output.name == CLASS_IDS_NAME for output in session.get_outputs())


def export_onnx(model: nn.Module, path: str | Path | None = None, opset: int = 17, fuse_bn: bool = True) -> bytes:
    """Export ``model`` to ONNX with dynamic batch, height and width (input ``image``, outputs ``logits`` and
    ``class_ids``, see :func:`add_class_ids`).

    Args:
        model: the network; it is not modified (BN fusion works on a copy, and its train/eval mode is restored).
        path: when given, the ``.onnx`` file is also written there (atomically).
        opset: ONNX opset version.
        fuse_bn: fold BatchNorm into the convolutions first (fewer ops, same function).

    Returns:
        The serialized model.

    Shape:
        - Input ``image``: ``(N, 3, H, W)`` float32, normalised BGR; H, W >= 64.
        - Output ``logits``: ``(N, num_classes, H, W)``; output ``class_ids``: ``(N, H, W)`` uint8.
    """
    net = fold_batchnorm(model) if fuse_bn else model
    was_training = net.training
    net.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The model's Python input checks become constants in the trace: expected, not worth a warning.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False on purpose: the TorchScript exporter takes ~1 s here (the dynamo one 10-20 s) and keeps
            # H x W dynamic through the align_corners resizes without dynamic_shapes; its deprecation notice is
            # expected.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                net,
                (torch.zeros(1, 3, *_TRACE_SIZE),),
                buffer,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: _DIMS, OUTPUT_NAME: _DIMS},
                dynamo=False,
            )
    finally:
        net.train(was_training)
    exported = onnx.load_from_string(buffer.getvalue())
    if num_classes(exported.graph) is not None:  # the exporter leaves the class axis unnamed and unsized
        exported.graph.output[0].type.tensor_type.shape.dim[1].dim_value = num_classes(exported.graph)
    data = add_class_ids(exported).SerializeToString()
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


def create_session(
    onnx_model: bytes | str | Path,
    num_threads: int | None = None,
    channel_block: int | None = None,
    profile_prefix: str | None = None,
):
    """An onnxruntime CPU session tuned for this model, with the ``class_ids`` output added when a file lacks it.

    All graph optimisations, ``num_threads`` intra-op threads (default: ``torch.get_num_threads()``), one inter-op
    thread, and the CPU memory arena on: it keeps large activations mapped between calls instead of page-faulting
    them in on every forward (see ``benchmarks/RESULTS.md``). Convolutions are padded with zero channels to a
    multiple of ``channel_block`` so that ONNX Runtime runs all of them in its blocked layout
    (:mod:`segmentation.inference.channel_padding`; the file itself is not changed).

    Args:
        onnx_model: serialized model bytes or a path to an ``.onnx`` file.
        num_threads: intra-op threads.
        channel_block: the channel multiple; ``None`` takes ``SEGMENTATION_CHANNEL_BLOCK`` or else this CPU's for
            this kind of graph, fp32 or INT8 (:func:`~segmentation.inference.channel_padding.configured_block`);
            0 pads nothing.
        profile_prefix: when given, ONNX Runtime profiles every run into ``<prefix>_<date>.json``
            (``session.end_profiling()`` returns the path).

    Returns:
        An ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort  # heavy, and only needed on the ONNX paths

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = True
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if isinstance(onnx_model, (str, Path)):
        onnx_model = Path(onnx_model).read_bytes()
    model = add_class_ids(onnx.load_from_string(onnx_model))
    quantized = any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    block = configured_block(quantized) if channel_block is None else channel_block
    if block > 1:
        padded = onnx.ModelProto()
        padded.CopyFrom(model)
        try:
            if pad_channels(inline_shared_initializers(padded), block):
                return ort.InferenceSession(padded.SerializeToString(), options, providers=EXECUTION_PROVIDERS)
        except Exception as exc:  # padding is only for speed: never let it stop a model that loads without it
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            logger.warning("channel padding skipped (%s: %s)", type(exc).__name__, first_line)
    return ort.InferenceSession(model.SerializeToString(), options, providers=EXECUTION_PROVIDERS)
