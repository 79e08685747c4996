"""ONNX export of a segmentation network and the onnxruntime session that runs it, each written once.

Export, export verification, the :class:`~segmentation.inference.predictor.Predictor` and serving all use these two
functions, so the session that was verified is the session that serves.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from segmentation.io import atomic_path
from segmentation.models import fuse_bn as fold_batchnorm

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXECUTION_PROVIDERS = ["CPUExecutionProvider"]
_DIMS = {0: "batch", 2: "height", 3: "width"}
_TRACE_SIZE = (64, 128)  # any size the network accepts: height and width are exported as dynamic axes


def export_onnx(model: nn.Module, path: str | Path | None = None, opset: int = 17, fuse_bn: bool = True) -> bytes:
    """Export ``model`` to ONNX with dynamic batch, height and width (input ``image``, output ``logits``).

    Args:
        model: the network; it is not modified (BN fusion works on a copy, and its train/eval mode is restored).
        path: when given, the ``.onnx`` file is also written there (atomically).
        opset: ONNX opset version.
        fuse_bn: fold BatchNorm into the convolutions first (fewer ops, same function).

    Returns:
        The serialized model.

    Shape:
        - Input ``image``: ``(N, 3, H, W)`` float32, normalised BGR; H, W >= 64.
        - Output ``logits``: ``(N, num_classes, H, W)``.
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
    data = buffer.getvalue()
    if path is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return data


def create_session(onnx_model: bytes | str | Path, num_threads: int | None = None):
    """An onnxruntime CPU session tuned for this model.

    All graph optimisations, ``num_threads`` intra-op threads (default: ``torch.get_num_threads()``), one inter-op
    thread, and the CPU memory arena on: it keeps large activations mapped between calls instead of page-faulting
    them in on every forward (see ``benchmarks/RESULTS.md``).

    Args:
        onnx_model: serialized model bytes or a path to an ``.onnx`` file.
        num_threads: intra-op threads.

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
    if isinstance(onnx_model, Path):
        onnx_model = str(onnx_model)
    return ort.InferenceSession(onnx_model, options, providers=EXECUTION_PROVIDERS)
