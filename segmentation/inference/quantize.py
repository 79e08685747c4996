"""Other numeric formats of an exported ONNX network: INT8 static quantization (CPU) and FP16 (GPU).

INT8 uses onnxruntime's static quantization: QDQ format (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses
into integer kernels), per-channel symmetric int8 weights, uint8 activations whose ranges are calibrated (MinMax) on
a few images of the model's own training data. Nodes named in ``nodes_to_exclude`` stay in fp32.

Weights use 7 of their 8 bits (``reduce_range``). On x86 CPUs without VNNI, ONNX Runtime multiplies uint8 activations
by int8 weights with AVX2's ``vpmaddubsw``, which adds pairs of products into int16 and saturates: 2 x 255 x 127 does
not fit, 2 x 255 x 64 does. With full-range weights the tiny test model lost 0.77 mIoU points on an AVX2 machine and
none on an AVX-512 VNNI one; a file must score the same on every CPU it may be served on.

FP16 converts weights and activations to float16 and keeps fp32 at the graph's input and output. ONNX Runtime's CPU
provider has few fp16 kernels and inserts casts around the rest, so it is a GPU format: on a CPU it runs, slowly.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx

from segmentation.inference.onnx import (
    CLASS_IDS_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    add_class_ids,
    inline_shared_initializers,
)
from segmentation.inference.tta import pad_to_min_side
from segmentation.io import atomic_path
from segmentation.models.preprocessing import to_input_tensor

logger = logging.getLogger(__name__)


# Calibration only needs activation ranges: images larger than this are downscaled (keeping their aspect), which
# keeps calibrating 8 Cityscapes frames to seconds instead of minutes.
CALIBRATION_MAX_PIXELS = 512 * 1024


def calibration_inputs(images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Network inputs (``1 x 3 x H x W`` float32, normalised) of BGR uint8 images, downscaled to at most
    :data:`CALIBRATION_MAX_PIXELS` and padded as the Predictor pads them."""
    inputs = []
    for image in images:
        height, width = image.shape[:2]
        scale = min(1.0, (CALIBRATION_MAX_PIXELS / (height * width)) ** 0.5)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        inputs.append(pad_to_min_side(to_input_tensor(image)).numpy())
    if not inputs:
        raise ValueError("INT8 calibration needs at least one image, got none")
    return inputs


def _network_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without the appended class-id nodes: they are not quantized, and are appended again after."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    keep = [n for n in model.graph.node if not any(o.startswith(CLASS_IDS_NAME) for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    outputs = [o for o in model.graph.output if o.name != CLASS_IDS_NAME]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def _load(onnx_model: bytes | str | Path) -> onnx.ModelProto:
    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    return onnx.load_from_string(data)


def quantize_int8(
    onnx_model: bytes | str | Path,
    images: Sequence[np.ndarray],
    path: str | Path,
    nodes_to_exclude: Sequence[str] = (),
    per_channel: bool = True,
) -> Path:
    """Write an INT8 (QDQ) copy of an fp32 ONNX network to ``path``, calibrated on ``images``.

    Args:
        onnx_model: the fp32 network (bytes or a file), as :func:`segmentation.inference.onnx.export_onnx` writes it.
        images: BGR uint8 calibration images (:func:`calibration_inputs` prepares them).
        path: where the ``.onnx`` file is written (atomically).
        nodes_to_exclude: node names kept in fp32 (see :func:`conv_names` for the first and last convolutions).
        per_channel: one weight scale per output channel (much more accurate for convolutions).

    Returns:
        ``path``; the file has the ``logits`` and ``class_ids`` outputs like the fp32 one.

    Raises:
        ValueError: no calibration images, or a node to exclude that the graph does not have.
    """
    from onnxruntime.quantization import (  # heavy, and only needed when exporting INT8
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = inline_shared_initializers(_network_only(_load(onnx_model)))
    names = {node.name for node in model.graph.node}
    unknown = [n for n in nodes_to_exclude if n not in names]
    if unknown:
        raise ValueError(f"nodes_to_exclude: {unknown} are not nodes of the graph; e.g. {sorted(names)[:5]}")
    inputs = calibration_inputs(images)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(inputs)

        def get_next(self) -> dict | None:
            item = next(self._items, None)
            return None if item is None else {INPUT_NAME: item}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(fp32))
        quantize_static(
            str(fp32),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )
        data = add_class_ids(onnx.load(str(int8))).SerializeToString()
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(data)
    return Path(path)


def _float_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make the ``logits`` output float32 again: the converter keeps Resize in fp32 (its default block list) and
    then casts the Resize's output, which is the graph's output here, back to float16 despite ``keep_io_types``."""
    graph = model.graph
    output = next(o for o in graph.output if o.name == OUTPUT_NAME)
    if output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
        return model
    half = f"{OUTPUT_NAME}_fp16"
    for node in graph.node:
        node.output[:] = [half if name == OUTPUT_NAME else name for name in node.output]
        node.input[:] = [half if name == OUTPUT_NAME else name for name in node.input]
    graph.node.append(onnx.helper.make_node("Cast", [half], [OUTPUT_NAME], to=onnx.TensorProto.FLOAT))
    output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def convert_fp16(onnx_model: bytes | str | Path, path: str | Path) -> Path:
    """Write an FP16 copy of an fp32 ONNX network to ``path`` (fp32 input and outputs, fp16 inside)."""
    from onnxconverter_common import float16  # only needed when exporting FP16

    model = _network_only(_load(onnx_model))
    with warnings.catch_warnings():  # weights below float16's range are clipped to its smallest value, as intended
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    data = add_class_ids(_float_logits(half)).SerializeToString()
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(data)
    return Path(path)


def conv_names(onnx_model: bytes | str | Path) -> list[str]:
    """Names of the Conv nodes in graph order (the first reads the image; the last produces the class scores)."""
    return [node.name for node in _load(onnx_model).graph.node if node.op_type == "Conv"]


def default_int8_exclusions(onnx_model: bytes | str | Path) -> list[str]:
    """The nodes :func:`quantize_int8` keeps in fp32 by default: the first convolution (it reads the normalised
    image, whose few input channels quantize poorly per tensor) and the last one (the class scores, whose small
    margins decide the argmax). Measured in ``benchmarks/formats.py``."""
    names = conv_names(onnx_model)
    return [names[0], names[-1]] if names else []
