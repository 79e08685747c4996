"""ONNX export of a segmentation network and the onnxruntime session that runs it, each written once.

Export, export verification, the :class:`~segmentation.inference.predictor.Predictor` and serving all use these two
functions, so the logits session that was verified is the one that serves; the Predictor checks its class-ids
session against those logits on a probe when it makes it.

Every graph has two outputs, ``logits`` and ``class_ids`` (:mod:`segmentation.inference.graph_outputs`, whose names
are importable from here too); ``create_session(..., only=...)`` makes a session with one of them.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from segmentation.inference.channel_padding import configured_block, pad_channels
from segmentation.inference.graph_outputs import (
    CLASS_IDS_NAME,
    MAX_CLASS_IDS,
    OUTPUT_NAME,
    add_class_ids,
    num_classes,
    one_output_graph,
    output_names,
)
from segmentation.io import atomic_path
from segmentation.models import fuse_bn as fold_batchnorm

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_IDS_NAME",
    "EXECUTION_PROVIDERS",
    "INPUT_NAME",
    "MAX_CLASS_IDS",
    "OUTPUT_NAME",
    "add_class_ids",
    "create_session",
    "export_onnx",
    "inline_shared_initializers",
    "num_classes",
    "one_output_graph",
    "output_names",
]

INPUT_NAME = "image"
EXECUTION_PROVIDERS = ["CPUExecutionProvider"]
_DIMS = {0: "batch", 2: "height", 3: "width"}
_TRACE_SIZE = (64, 128)  # any size the network accepts: height and width are exported as dynamic axes


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
    only: str | None = None,
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
        only: ``"logits"`` or ``"class_ids"``: a session with that output alone (:func:`one_output_graph`), which
            skips the work of the other; by default both.

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        ValueError: ``only`` names an output the graph does not have (``class_ids`` of a model with more than
            :data:`MAX_CLASS_IDS` classes, for instance), or ``SEGMENTATION_CHANNEL_BLOCK`` holds a value other than
            0, 8 or 16.
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
    if only is not None:
        model = one_output_graph(model, only)
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
