"""Zero channels that let ONNX Runtime run every convolution of a network in its blocked (NCHWc) layout.

ONNX Runtime's CPU provider moves a convolution to its NCHWc kernels only when the input channels are a multiple of
the CPU's block (8 floats with AVX2, 16 with AVX-512), and concatenates NCHWc tensors only when every part is. The
harmonic widths of FC-HarDNet (10, 18, 28, 46, ... channels) break both for 40 of its 70 convolutions: they run as
im2col + GEMM in NCHW, with layout reorders around them. :func:`pad_channels` appends zero output channels to such
convolutions (zero weights, zero bias) and gives every reader of them zero weights for those channels. ReLU,
pooling, resizing and concatenation keep a zero channel zero, so the network computes the same function (up to the
summation order of the convolutions) while every tensor between convolutions is block-aligned.

Measured on a 2-core AVX2 CPU (``benchmarks/RESULTS.md``): all 70 convolutions run as NCHWc at 1.18x the
multiply-adds, and the network takes ~10 % less time at 512x1024 and at 1024x2048. :func:`padding_block` applies it
there only: on AVX-512 the block of 16 would add far more zero work, and the unpadded graph already ran at >= 90 %
of the GEMM rate there.

A tensor carries padding only when every path from it stays inside what this pass understands: plain convolutions
(float weights in initializers, one group), per-channel ops (:data:`SAME_LAYOUT`), channel concatenation, and
``Shape`` reads of height and width. Anything else (a graph output, a reshape, an elementwise op with another
tensor) leaves the convolution that produces it unpadded. Quantized (QDQ) and float16 graphs pass unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

# Per-channel ops that map a zero channel to a zero channel and keep the channel order.
SAME_LAYOUT = frozenset({"Relu", "AveragePool", "MaxPool", "Resize"})
AVX2_BLOCK = 8  # floats per NCHWc block in ONNX Runtime's AVX2 kernels


@functools.cache
def padding_block() -> int:
    """The block :func:`pad_channels` pads to on this CPU: 8 with AVX2 and without AVX-512, else 0 (no padding).

    Read from ``/proc/cpuinfo``; 0 where it cannot be read.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return 0
    flags = set(line.partition(":")[2].split())
    return AVX2_BLOCK if {"avx2", "fma"} <= flags and "avx512f" not in flags else 0


class _Graph:
    """Lookups over one graph: initializers, constants, consumers, and the channel count of each tensor that
    convolutions produce (``None`` where it is not known from the weights alone)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants = {
            node.output[0]: numpy_helper.to_array(node.attribute[0].t)
            for node in graph.node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
        }
        self.constants.update({name: numpy_helper.to_array(init) for name, init in self.initializers.items()})
        self.outputs = {output.name for output in graph.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            for slot, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, slot))
        self.channels: dict[str, int] = {}
        for node in graph.node:
            if self.plain_conv(node):
                self.channels[node.output[0]] = self.initializers[node.input[1]].dims[0]
            elif node.op_type in SAME_LAYOUT and node.input[0] in self.channels:
                self.channels[node.output[0]] = self.channels[node.input[0]]
            elif self.channel_concat(node) and all(name in self.channels for name in node.input):
                self.channels[node.output[0]] = sum(self.channels[name] for name in node.input)
        self._can_pad: dict[str, bool] = {}

    def plain_conv(self, node: onnx.NodeProto) -> bool:
        """A one-group 2-D convolution whose float32 weights (and bias, if any) are initializers."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            return False
        weight = self.initializers.get(node.input[1])
        bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in self.initializers
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        return (
            weight is not None and weight.data_type == onnx.TensorProto.FLOAT and len(weight.dims) == 4
            and bias_ok and group == 1
        )  # fmt: skip

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
        if node.op_type in SAME_LAYOUT:
            return slot == 0 and self.can_pad(node.output[0])
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

    def _shape_use_ok(self, node: onnx.NodeProto, slot: int, tensor: str) -> bool:
        """A read of ``Shape(tensor)`` that is blind to its channel count: a ``Gather`` of another dimension, or the
        exporter's ``Slice[0:2]`` that only feeds ``tensor``'s own ``Resize`` sizes (which keep its channels)."""
        if slot != 0:
            return False
        if node.op_type == "Gather":
            index = self.constants.get(node.input[1])
            axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
            return axis == 0 and index is not None and index.ndim == 0 and int(index) not in (1, -3)
        if node.op_type == "Slice" and len(node.input) in (4, 5):
            starts, ends, axes = (self.constants.get(name) for name in node.input[1:4])
            steps = self.constants.get(node.input[4]) if len(node.input) == 5 else np.array([1])
            if any(v is None for v in (starts, ends, axes, steps)):
                return False
            if [starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()] != [[0], [2], [0], [1]]:
                return False
            sizes = [reader for concat, _ in self._readers(node) for reader in self._readers(concat)]
            concats_ok = all(n.op_type == "Concat" for n, _ in self._readers(node))
            return concats_ok and all(n.op_type == "Resize" and s == 3 and n.input[0] == tensor for n, s in sizes)
        return False


def pad_channels(model: onnx.ModelProto, block: int) -> int:
    """Pad the outputs of convolutions to a multiple of ``block`` channels with zeros, in place (see the module).

    Args:
        model: an fp32 ONNX model; run :func:`segmentation.inference.onnx.inline_shared_initializers` first so
            that biases shared through Identity nodes count as initializers.
        block: the channel multiple; below 2 nothing changes.

    Returns:
        How many convolutions were padded.
    """
    if block < 2:
        return 0
    graph = _Graph(model.graph)
    layouts: dict[str, np.ndarray] = {}  # tensors that carry padding: True for a real channel, False for a zero one
    padded = 0
    for index, node in enumerate(model.graph.node):
        if graph.plain_conv(node):
            padded += _pad_conv(model.graph, graph, node, index, layouts, block)
        elif node.op_type in SAME_LAYOUT and node.input[0] in layouts:
            layouts[node.output[0]] = layouts[node.input[0]]
        elif graph.channel_concat(node) and any(name in layouts for name in node.input):
            parts = [layouts.get(name, np.ones(graph.channels[name], bool)) for name in node.input]
            layouts[node.output[0]] = np.concatenate(parts)
    _drop_stale(model.graph, layouts)
    return padded


def _pad_conv(
    onnx_graph: onnx.GraphProto, graph: _Graph, node: onnx.NodeProto, index: int, layouts: dict, block: int
) -> int:
    weight = numpy_helper.to_array(graph.initializers[node.input[1]])
    new_weight = weight
    layout = layouts.get(node.input[0])
    if layout is not None:  # the input carries zero channels: read them with zero weights
        new_weight = np.zeros((weight.shape[0], layout.size, *weight.shape[2:]), weight.dtype)
        new_weight[:, layout] = weight
    out_channels = weight.shape[0]
    extra = -out_channels % block
    pad_output = extra > 0 and graph.can_pad(node.output[0])
    if pad_output:
        new_weight = np.concatenate([new_weight, np.zeros((extra, *new_weight.shape[1:]), weight.dtype)])
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(graph.initializers[node.input[2]])
            node.input[2] = _add_initializer(onnx_graph, np.concatenate([bias, np.zeros(extra, bias.dtype)]), index)
        layouts[node.output[0]] = np.concatenate([np.ones(out_channels, bool), np.zeros(extra, bool)])
    if new_weight is not weight:
        node.input[1] = _add_initializer(onnx_graph, new_weight, index)
    return int(pad_output)


def _add_initializer(graph: onnx.GraphProto, array: np.ndarray, index: int) -> str:
    name = f"channel_padding_{index}_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _drop_stale(graph: onnx.GraphProto, layouts: dict) -> None:
    """Remove initializers nothing reads any more, and shape annotations of tensors whose channel count changed."""
    used = {name for node in graph.node for name in node.input} | {i.name for i in graph.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    infos = [info for info in graph.value_info if info.name not in layouts]
    del graph.value_info[:]
    graph.value_info.extend(infos)
