"""Zero channels that let ONNX Runtime run every convolution of a network in its blocked (NCHWc) layout.

ONNX Runtime's CPU provider moves a convolution to its NCHWc kernels only when the input channels are a multiple of
the CPU's block (8 floats with AVX2, 16 with AVX-512), and concatenates NCHWc tensors only when every part is. The
harmonic widths of FC-HarDNet (10, 18, 28, 46, ... channels) break both for 40 of its 70 convolutions: they run as
im2col + GEMM in NCHW, with layout reorders around them. :func:`pad_channels` appends zero output channels to such
convolutions (zero weights, zero bias) and gives every reader of them zero weights for those channels. ReLU,
pooling, resizing and concatenation keep a zero channel zero, so the network computes the same function (up to the
summation order of the convolutions) while every tensor between convolutions is block-aligned.

Measured on 2-core CPUs (README, *Figures*): on AVX2 all 70 convolutions run as NCHWc at 1.18x the multiply-adds,
and interleaved runs of the two sessions took 1.07-1.11x less time at 512x1024 and 1.05-1.09x at 1024x2048. With
AVX-512 the block is 16 (1.35x the multiply-adds): 1.14-1.19x less time on an Intel CPU with AMX and 1.02-1.15x on
an AMD Zen 5 CPU (its blocked convolutions ran at ~490 GFLOP/s, the im2col ones at 110-360). An AMD Zen 4 CPU,
whose AVX-512 units are half as wide, gave 1.00-1.08x on a busy day, never slower, but its unpadded graph ran at
>= 90 % of the GEMM rate on a quiet one, so it may gain nothing there (not measured again since).
:func:`padding_block` pads on every AVX2 (with FMA) and AVX-512 CPU; the environment variable :data:`BLOCK_ENV`
overrides it (``0``, ``8`` or ``16``; ``python -m benchmarks.inference --padding-ab`` measures which is fastest on a
given CPU).

A tensor carries padding only when every path from it stays inside what this pass understands: plain convolutions
(float weights in initializers, one group), per-channel ops (:data:`SAME_LAYOUT`), channel concatenation, and
``Shape`` reads of height and width. Anything else (a graph output, a reshape, an elementwise op with another
tensor, a subgraph) leaves the convolution that produces it unpadded, and weights a caller may override (graph
inputs) are never rewritten. Quantized (QDQ) and float16 graphs pass unchanged.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
from onnx import numpy_helper

# Per-channel ops that map a zero channel to a zero channel and keep the channel order.
SAME_LAYOUT = frozenset({"Relu", "AveragePool", "MaxPool", "Resize"})
AVX2_BLOCK = 8  # floats per NCHWc block in ONNX Runtime's AVX2 kernels
AVX512_BLOCK = 16  # ... and in its AVX-512 ones
BLOCK_ENV = "SEGMENTATION_CHANNEL_BLOCK"  # overrides padding_block(): 0 (no padding), 8 or 16


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (``avx2``, ``avx512f``, ...); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def padding_block(flags: frozenset[str] | None = None) -> int:
    """The block :func:`pad_channels` pads to on a CPU with these feature flags (default: this one's): 16 with
    AVX-512, 8 with AVX2 and FMA but no AVX-512, else 0 (no padding: older CPUs, and where the flags cannot be
    read). See the module for the measurements behind it."""
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return AVX512_BLOCK
    return AVX2_BLOCK if {"avx2", "fma"} <= flags else 0


def configured_block() -> int:
    """:data:`BLOCK_ENV` when it is set, else :func:`padding_block` for this CPU.

    Raises:
        ValueError: the variable holds something other than 0, 8 or 16.
    """
    raw = os.environ.get(BLOCK_ENV, "").strip()
    if not raw:
        return padding_block()
    if raw not in ("0", str(AVX2_BLOCK), str(AVX512_BLOCK)):
        raise ValueError(
            f"{BLOCK_ENV}={raw!r}: expected 0 (no padding), {AVX2_BLOCK} (AVX2 blocks) or {AVX512_BLOCK} (AVX-512 "
            "blocks), or leave it unset to let the CPU decide"
        )
    return int(raw)


class _Graph:
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
                self.channels[node.output[0]] = self.initializers[node.input[1]].dims[0]
            elif node.op_type in SAME_LAYOUT and node.input[0] in self.channels:
                self.channels[node.output[0]] = self.channels[node.input[0]]
            elif self.channel_concat(node) and all(name in self.channels for name in node.input):
                self.channels[node.output[0]] = sum(self.channels[name] for name in node.input)
        self._can_pad: dict[str, bool] = {}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a ``Constant`` node's output or of an initializer nobody can override; else ``None``."""
        node = self.producers.get(name)
        if node is not None:
            values = [attr.t for attr in node.attribute if attr.name == "value"]
            return numpy_helper.to_array(values[0]) if node.op_type == "Constant" and values else None
        init = self.initializers.get(name)
        return numpy_helper.to_array(init) if init is not None and name not in self.graph_inputs else None

    def plain_conv(self, node: onnx.NodeProto) -> bool:
        """A one-group 2-D convolution whose float32 weights (and bias, if any) are initializers no input overrides."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            return False
        weight = self.initializers.get(node.input[1])
        bias = node.input[2] if len(node.input) > 2 else ""
        bias_ok = not bias or (bias in self.initializers and bias not in self.graph_inputs)
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        return (
            weight is not None and weight.data_type == onnx.TensorProto.FLOAT and len(weight.dims) == 4
            and node.input[1] not in self.graph_inputs and bias_ok and group == 1
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


def pad_channels(model: onnx.ModelProto, block: int) -> int:
    """Pad the outputs of convolutions to a multiple of ``block`` channels with zeros, in place (see the module).

    Args:
        model: an fp32 ONNX model; run :func:`segmentation.inference.onnx.inline_shared_initializers` first so
            that biases shared through Identity nodes count as initializers.
        block: the channel multiple; below 2 nothing changes.

    Returns:
        How many convolutions were padded.
    """
    if block < 2 or any(
        attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attr in node.attribute
    ):
        return 0  # a subgraph (If, Loop, Scan) may read any tensor: this pass does not look inside them
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
    if layouts:
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
            node.input[2] = _add_initializer(
                onnx_graph, graph.names, np.concatenate([bias, np.zeros(extra, bias.dtype)]), index
            )
        layouts[node.output[0]] = np.concatenate([np.ones(out_channels, bool), np.zeros(extra, bool)])
    if new_weight is not weight:
        node.input[1] = _add_initializer(onnx_graph, graph.names, new_weight, index)
    return int(pad_output)


def _add_initializer(graph: onnx.GraphProto, names: set[str], array: np.ndarray, index: int) -> str:
    name, n = f"channel_padding_{index}", 0
    while name in names:
        n += 1
        name = f"channel_padding_{index}_{n}"
    names.add(name)
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
