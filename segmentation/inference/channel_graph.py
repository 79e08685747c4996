"""What :func:`segmentation.inference.channel_padding.pad_channels` may pad: the channel count of each tensor that
convolutions produce, which convolutions hold constant weights (float32, or 8-bit behind a ``DequantizeLinear``), and
whether every reader of a tensor passes zero channels on as zero channels."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Per-channel ops that map a zero channel to a zero channel and keep the channel order.
SAME_LAYOUT = frozenset({"Relu", "AveragePool", "MaxPool", "Resize"})
QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


class ChannelGraph:
    """Lookups over one graph: producers, consumers, constants, and the channel count of each tensor that
    convolutions produce (absent where the weights alone do not tell it)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.graph_inputs = {value.name for value in graph.input}  # a caller may feed these: never rewritten
        self.outputs = {output.name for output in graph.output}
        self.producers = {name: node for node in graph.node for name in node.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for slot, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, slot))
        self.names = set(self.initializers) | self.graph_inputs | self.outputs | set(self.producers)
        self.names |= set(self.consumers) | {info.name for info in graph.value_info}
        self.channels: dict[str, int] = {}
        for node in graph.node:
            if self.plain_conv(node):
                self.channels[node.output[0]] = self.weight_dims(node)[0]
            elif self.same_layout(node) and node.input[0] in self.channels:
                self.channels[node.output[0]] = self.channels[node.input[0]]
            elif self.channel_concat(node) and all(name in self.channels for name in node.input):
                self.channels[node.output[0]] = sum(self.channels[name] for name in node.input)
        self._can_pad: dict[str, bool] = {}
        self.reshaped: set[str] = set()  # dequantized weights and biases whose shape the pass changed

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a ``Constant`` node's output or of an initializer nobody can override; else ``None``."""
        node = self.producers.get(name)
        if node is not None:
            values = [attr.t for attr in node.attribute if attr.name == "value"]
            return numpy_helper.to_array(values[0]) if node.op_type == "Constant" and values else None
        init = self.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None and name not in self.graph_inputs else None

    def plain_conv(self, node: onnx.NodeProto) -> bool:
        """A one-group 2-D convolution whose weights (and bias, if any) are constants no input overrides: float32
        initializers, or quantized ones behind a ``DequantizeLinear`` (:meth:`dequantized`)."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            return False
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        dims = self.weight_dims(node)
        if group != 1 or dims is None:
            return False
        bias = node.input[2] if len(node.input) > 2 else ""
        if not bias:
            return True
        if bias in self.initializers:
            return bias not in self.graph_inputs and self.initializers[bias].data_type == onnx.TensorProto.FLOAT
        bias_dq = self.dequantized(bias, (onnx.TensorProto.INT32,), 1)
        return bias_dq is not None and self.initializers[bias_dq.input[0]].dims[0] == dims[0]

    def weight_dims(self, node: onnx.NodeProto) -> list[int] | None:
        """The 4-D shape of a convolution's constant float32 or quantized weights, else ``None``."""
        name = node.input[1]
        weight = self.initializers.get(name)
        if weight is not None:
            ok = weight.data_type == onnx.TensorProto.FLOAT and len(weight.dims) == 4 and name not in self.graph_inputs
            return list(weight.dims) if ok else None
        dq = self.dequantized(name, EIGHT_BIT, 4)
        return list(self.initializers[dq.input[0]].dims) if dq is not None else None

    def dequantized(self, name: str, types: tuple[int, ...], ndim: int) -> onnx.NodeProto | None:
        """The ``DequantizeLinear`` that makes ``name`` from a constant ``ndim``-D tensor of one of ``types``, with a
        constant scale (and zero point) for the whole tensor or per slice of axis 0, when ``name`` has no other
        reader (the pass rewrites that node's inputs); else ``None``."""
        dq = self.producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            return None
        if len(self.consumers.get(name, [])) != 1 or name in self.outputs:
            return None
        values = self.initializers.get(dq.input[0])
        if values is None or dq.input[0] in self.graph_inputs or values.data_type not in types:
            return None
        if len(values.dims) != ndim:
            return None
        params = [self.constant(arg) for arg in dq.input[1:3] if arg]
        if any(param is None for param in params) or params[0].dtype != np.float32 or _blocked(dq):
            return None
        axis = next((attr.i for attr in dq.attribute if attr.name == "axis"), 1)
        per_tensor = all(param.size == 1 and param.ndim <= 1 for param in params)
        per_channel = axis in (0, -ndim) and all(param.shape == (values.dims[0],) for param in params)
        return dq if per_tensor or per_channel else None

    def same_layout(self, node: onnx.NodeProto) -> bool:
        """An op that maps each channel to the same channel and a zero channel to a zero one."""
        if node.op_type in SAME_LAYOUT:
            return True
        if node.op_type not in QDQ or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        params = [self.constant(arg) for arg in node.input[1:3] if arg]
        return not _blocked(node) and all(
            param is not None and param.size == 1 and param.ndim <= 1 for param in params
        )

    @staticmethod
    def channel_concat(node: onnx.NodeProto) -> bool:
        return node.op_type == "Concat" and any(attr.name == "axis" and attr.i == 1 for attr in node.attribute)

    def can_pad(self, tensor: str) -> bool:
        """Whether ``tensor`` may carry zero channels: every reader is understood and passes them on safely."""
        if tensor not in self._can_pad:
            self._can_pad[tensor] = False  # a cycle (there is none in a valid graph) would mean no
            self._can_pad[tensor] = tensor not in self.outputs and all(
                self._reader_accepts(node, slot, tensor) for node, slot in self.consumers.get(tensor, [])
            )
        return self._can_pad[tensor]

    def _reader_accepts(self, node: onnx.NodeProto, slot: int, tensor: str) -> bool:
        if self.plain_conv(node):
            return slot == 0
        if self.same_layout(node):
            extra_outputs = any(node.output[1:])  # MaxPool's indices count the channels
            resize_ok = node.op_type != "Resize" or self._resize_keeps_channels(node, tensor)
            return slot == 0 and not extra_outputs and resize_ok and self.can_pad(node.output[0])
        if self.channel_concat(node):
            return all(name in self.channels for name in node.input) and self.can_pad(node.output[0])
        if node.op_type == "Shape":
            return (
                not node.attribute
                and node.output[0] not in self.outputs
                and all(self._shape_use_ok(n, s, tensor) for n, s in self._readers(node))
            )
        return False

    def _readers(self, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
        return [reader for output in node.output for reader in self.consumers.get(output, [])]

    def _leading_two(self, node: onnx.NodeProto) -> bool:
        """A ``Slice`` of elements ``[0:2]`` (batch and channels of a shape) with constant arguments."""
        if node.op_type != "Slice" or len(node.input) not in (4, 5):
            return False
        args = [self.constant(name) for name in node.input[1:]]
        if len(args) == 3:
            args.append(np.array([1]))
        if any(arg is None for arg in args):
            return False
        return [arg.tolist() for arg in args] == [[0], [2], [0], [1]]

    def _resize_keeps_channels(self, node: onnx.NodeProto, tensor: str) -> bool:
        """A ``Resize`` of ``tensor`` whose output has as many channels as its input, whatever that number is:
        constant scales of 1 on the channel axis, or sizes whose first two come from ``Shape(tensor)[0:2]``."""
        sizes = node.input[3] if len(node.input) > 3 else ""
        if sizes:
            concat = self.producers.get(sizes)
            if concat is None or concat.op_type != "Concat" or not concat.input:
                return False
            head = self.producers.get(concat.input[0])
            shape = self.producers.get(head.input[0]) if head is not None and self._leading_two(head) else None
            return shape is not None and shape.op_type == "Shape" and not shape.attribute and shape.input[0] == tensor
        scales_name = node.input[1] if len(node.input) == 2 else (node.input[2] if len(node.input) > 2 else "")
        scales = self.constant(scales_name) if scales_name else None
        return scales is not None and scales.ndim == 1 and scales.size >= 2 and float(scales[1]) == 1.0

    def _shape_use_ok(self, node: onnx.NodeProto, slot: int, tensor: str) -> bool:
        """A read of ``Shape(tensor)`` that is blind to its channel count: a ``Gather`` of another dimension, or the
        exporter's ``Slice[0:2]`` that only feeds ``tensor``'s own ``Resize`` sizes (which keep its channels)."""
        if slot != 0:
            return False
        if node.op_type == "Gather":
            index = self.constant(node.input[1])
            axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
            return axis == 0 and index is not None and index.ndim == 0 and int(index) not in (1, -3)
        if self._leading_two(node) and node.output[0] not in self.outputs:
            concats = [n for n, _ in self._readers(node)]
            if not all(n.op_type == "Concat" and n.output[0] not in self.outputs for n in concats):
                return False
            sizes = [reader for concat in concats for reader in self._readers(concat)]
            return all(n.op_type == "Resize" and s == 3 and n.input[0] == tensor for n, s in sizes)
        return False


def _blocked(node: onnx.NodeProto) -> bool:
    """A (de)quantization with per-block parameters (opset 21's ``block_size``): not per tensor, not per channel."""
    return any(attr.name == "block_size" and attr.i for attr in node.attribute)
