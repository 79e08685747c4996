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
whose AVX-512 units are half as wide, gave 1.00-1.08x on one busy day and 1.10-1.11x on another.
:func:`padding_block` pads on every AVX2 (with FMA) and AVX-512 CPU; the environment variable :data:`BLOCK_ENV`
overrides it (``0``, ``8`` or ``16``; ``python -m benchmarks.inference --padding-ab`` measures which is fastest on a
given CPU).

A tensor carries padding only when every path from it stays inside what this pass understands
(:class:`~segmentation.inference.channel_graph.ChannelGraph`): plain convolutions (one group; float weights in
initializers, or 8-bit ones behind a ``DequantizeLinear`` only that convolution reads), per-channel ops (ReLU,
pooling, resizing, and ``QuantizeLinear``/``DequantizeLinear`` with one scale and zero point for the whole tensor,
which map 0 to the zero point and back to 0), channel concatenation, and ``Shape`` reads of height and width.
Anything else (a graph output, a reshape, an elementwise op with another tensor, a subgraph)
leaves the convolution that produces it unpadded, and weights a caller may override (graph inputs) are never
rewritten. INT8 (QDQ) graphs are padded like fp32 ones: a padded input channel of a quantized convolution gets
weights equal to its zero point, a padded output channel zero weights and zero bias (with a real channel's scales),
so the integer sums of the real channels, hence the outputs, are exactly those of the unpadded graph; the default
INT8 file then ran 1.24x faster at 1024x2048 on an AMD Zen 5 CPU (AVX-512 VNNI), blocks 8 and 16 alike, and
1.33-1.43x at 1024x2048 (1.20-1.28x at 512x1024) on a Zen 4 one, where block 8 was at least as fast as 16 at both
sizes in each of three runs (``--padding-ab --int8``), so INT8 graphs are padded to 8 on such CPUs, and by default
only there: ONNX Runtime's 8-bit kernels differ per ISA (AVX2, AVX-VNNI, AMX) and were not measured on the others.
Float16 graphs, and quantized ones with float16 scales or per-block parameters, pass unchanged.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
from onnx import numpy_helper

from segmentation.inference.channel_graph import EIGHT_BIT, ChannelGraph

AVX2_BLOCK = 8  # floats per NCHWc block in ONNX Runtime's AVX2 kernels
AVX512_BLOCK = 16  # ... and in its AVX-512 ones
QUANTIZED_BLOCK = 8  # INT8 graphs on AVX-512 VNNI CPUs (measured: the module docstring)
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


def padding_block(flags: frozenset[str] | None = None, quantized: bool = False) -> int:
    """The block :func:`pad_channels` pads to on a CPU with these feature flags (default: this one's): 16 with
    AVX-512, 8 with AVX2 and FMA but no AVX-512, else 0 (no padding: older CPUs, and where the flags cannot be
    read). For a ``quantized`` (QDQ) graph only where that was measured to pay: 8 with AVX-512 VNNI (its 8-bit
    convolutions are not blocked, and 8 was as fast as 16 or faster with fewer padded channels), else 0 (AVX2's
    8-bit kernels, with or without AVX-VNNI, and AMX were not measured). See the module for the measurements."""
    flags = cpu_flags() if flags is None else flags
    if quantized:
        return QUANTIZED_BLOCK if {"avx512f", "avx512_vnni"} <= flags and "amx_int8" not in flags else 0
    if "avx512f" in flags:
        return AVX512_BLOCK
    return AVX2_BLOCK if {"avx2", "fma"} <= flags else 0


def configured_block(quantized: bool = False) -> int:
    """:data:`BLOCK_ENV` when it is set (for any graph), else :func:`padding_block` for this CPU and kind of graph.

    Raises:
        ValueError: the variable holds something other than 0, 8 or 16.
    """
    raw = os.environ.get(BLOCK_ENV, "").strip()
    if not raw:
        return padding_block(quantized=quantized)
    if raw not in ("0", str(AVX2_BLOCK), str(AVX512_BLOCK)):
        raise ValueError(
            f"{BLOCK_ENV}={raw!r}: expected 0 (no padding), {AVX2_BLOCK} (AVX2 blocks) or {AVX512_BLOCK} (AVX-512 "
            "blocks), or leave it unset to let the CPU decide"
        )
    return int(raw)


def pad_channels(model: onnx.ModelProto, block: int) -> int:
    """Pad the outputs of convolutions to a multiple of ``block`` channels with zeros, in place (see the module).

    Args:
        model: an fp32 or INT8 (QDQ) ONNX model; run
            :func:`segmentation.inference.onnx.inline_shared_initializers` first so that biases shared through
            Identity nodes count as initializers.
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
    graph = ChannelGraph(model.graph)
    layouts: dict[str, np.ndarray] = {}  # tensors that carry padding: True for a real channel, False for a zero one
    padded = 0
    for index, node in enumerate(model.graph.node):
        if graph.plain_conv(node):
            padded += _pad_conv(model.graph, graph, node, index, layouts, block)
        elif graph.same_layout(node) and node.input[0] in layouts:
            layouts[node.output[0]] = layouts[node.input[0]]
        elif graph.channel_concat(node) and any(name in layouts for name in node.input):
            parts = [layouts.get(name, np.ones(graph.channels[name], bool)) for name in node.input]
            layouts[node.output[0]] = np.concatenate(parts)
    if layouts:
        _drop_stale(model.graph, {*layouts, *graph.reshaped})
    return padded


def _pad_conv(
    onnx_graph: onnx.GraphProto, graph: ChannelGraph, node: onnx.NodeProto, index: int, layouts: dict, block: int
) -> int:
    weights = _ConvWeights(graph, node)
    layout = layouts.get(node.input[0])
    if layout is not None:  # the input carries zero channels: read them with zero weights
        weights.read_padded_input(layout)
    out_channels = weights.values.shape[0]
    extra = -out_channels % block
    pad_output = extra > 0 and graph.can_pad(node.output[0])
    if pad_output:
        weights.add_zero_outputs(extra)
        if len(node.input) > 2 and node.input[2]:
            _pad_bias(onnx_graph, graph, node, index, extra)
        layouts[node.output[0]] = np.concatenate([np.ones(out_channels, bool), np.zeros(extra, bool)])
    weights.write(onnx_graph, index)
    return int(pad_output)


class _ConvWeights:
    """A convolution's weights, float32 or quantized (values, scale and zero point), to pad and write back."""

    def __init__(self, graph: ChannelGraph, node: onnx.NodeProto) -> None:
        self.graph, self.node = graph, node
        self.dq = None if node.input[1] in graph.initializers else graph.dequantized(node.input[1], EIGHT_BIT, 4)
        if self.dq is None:
            self.values = numpy_helper.to_array(graph.initializers[node.input[1]])
            self.scale = self.zero_point = None
        else:
            self.values = numpy_helper.to_array(graph.initializers[self.dq.input[0]])
            self.scale = graph.constant(self.dq.input[1])
            has_zero_point = len(self.dq.input) > 2 and self.dq.input[2]
            self.zero_point = graph.constant(self.dq.input[2]) if has_zero_point else None
        self.changed = self.params_changed = False

    def _zero(self) -> np.ndarray:
        """The stored value that means 0 for each output channel (broadcast over the other axes)."""
        if self.zero_point is None:
            return np.zeros((1, 1, 1, 1), self.values.dtype)
        return self.zero_point.reshape(-1, 1, 1, 1).astype(self.values.dtype)

    def read_padded_input(self, layout: np.ndarray) -> None:
        values = np.empty((self.values.shape[0], layout.size, *self.values.shape[2:]), self.values.dtype)
        values[...] = self._zero()
        values[:, layout] = self.values
        self.values, self.changed = values, True

    def add_zero_outputs(self, extra: int) -> None:
        per_channel = self.scale is not None and self.scale.size > 1
        rows = np.empty((extra, *self.values.shape[1:]), self.values.dtype)
        rows[...] = 0 if per_channel or self.zero_point is None else self.zero_point.reshape(())
        self.values = np.concatenate([self.values, rows])
        if per_channel:  # zero weights and zero point, and a real channel's scale (see _pad_bias)
            self.scale = np.concatenate([self.scale, np.full(extra, self.scale[-1], self.scale.dtype)])
            if self.zero_point is not None:
                self.zero_point = np.concatenate([self.zero_point, np.zeros(extra, self.zero_point.dtype)])
            self.params_changed = True
        self.changed = True

    def write(self, onnx_graph: onnx.GraphProto, index: int) -> None:
        if not self.changed:
            return
        names = self.graph.names
        if self.dq is None:
            self.node.input[1] = _add_initializer(onnx_graph, names, self.values, index)
            return
        self.dq.input[0] = _add_initializer(onnx_graph, names, self.values, index)
        if self.params_changed:  # else the scale and zero point stay as they are (possibly shared)
            self.dq.input[1] = _add_initializer(onnx_graph, names, self.scale, index)
            if self.zero_point is not None:
                self.dq.input[2] = _add_initializer(onnx_graph, names, self.zero_point, index)
        self.graph.reshaped.add(self.dq.output[0])


def _pad_bias(onnx_graph: onnx.GraphProto, graph: ChannelGraph, node: onnx.NodeProto, index: int, extra: int) -> None:
    """Zero bias for ``extra`` new output channels: a float32 initializer, or int32 behind a DequantizeLinear."""
    name = node.input[2]
    if name in graph.initializers:
        bias = numpy_helper.to_array(graph.initializers[name])
        node.input[2] = _add_initializer(
            onnx_graph, graph.names, np.concatenate([bias, np.zeros(extra, bias.dtype)]), index
        )
        return
    dq = graph.dequantized(name, (onnx.TensorProto.INT32,), 1)
    bias = numpy_helper.to_array(graph.initializers[dq.input[0]])
    dq.input[0] = _add_initializer(onnx_graph, graph.names, np.concatenate([bias, np.zeros(extra, bias.dtype)]), index)
    # Per-channel scale and zero point grow with the channels: zero point 0, and the last real channel's scale, as
    # the new weights got, so that every bias scale stays input scale x weight scale. ONNX Runtime fuses a
    # quantized convolution into its integer kernel only then (with scale 1 it ran 53 of them in fp32).
    for slot in (1, 2):
        param = graph.constant(dq.input[slot]) if len(dq.input) > slot and dq.input[slot] else None
        if param is not None and param.size > 1:
            fill = np.full(extra, param[-1], param.dtype) if slot == 1 else np.zeros(extra, param.dtype)
            dq.input[slot] = _add_initializer(onnx_graph, graph.names, np.concatenate([param, fill]), index)
    graph.reshaped.add(dq.output[0])


def _add_initializer(graph: onnx.GraphProto, names: set[str], array: np.ndarray, index: int) -> str:
    name, n = f"channel_padding_{index}", 0
    while name in names:
        n += 1
        name = f"channel_padding_{index}_{n}"
    names.add(name)
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _drop_stale(graph: onnx.GraphProto, changed: set[str]) -> None:
    """Remove initializers nothing reads any more, and shape annotations of tensors whose channel count changed."""
    used = {name for node in graph.node for name in node.input} | {i.name for i in graph.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    infos = [info for info in graph.value_info if info.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
