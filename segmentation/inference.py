"""The deployed inference path: one :class:`Predictor` used by predict, evaluate and serving.

A ``Predictor`` wraps a trained network (any ``nn.Module`` returning ``N x C x H x W`` logits) with BatchNorm
folded into the convolutions and runs it on one of three backends:

- ``"eager"``: the fused PyTorch module, NCHW;
- ``"channels_last"``: the fused module with weights and input in channels_last (NHWC) memory format;
- ``"onnxruntime"``: the fused module exported in-process to ONNX (TorchScript exporter, dynamic N/H/W) and run by
  an ONNX Runtime CPU session (all graph optimisations, intra-op threads = torch's, CPU memory arena on).

Why ``"auto"`` picks ONNX Runtime on a CPU (``python -m benchmarks.inference``, FC-HarDNet-70, batch 1, 2 threads;
numbers and caveats in ``benchmarks/RESULTS.md``): it was the fastest FC-HarDNet path, or within noise of it, in
every run; at 1024x2048 it reached 341 ms (207 GFLOP/s, ~90 % of the fp32 GEMM rate) and it is the only path
whose 1024x2048 time stays near 4x its 512x1024 time. PyTorch eager allocates every activation afresh; at
1024x2048 those buffers exceed glibc's mmap threshold, so each forward page-faults hundreds of MB back in. ONNX
Runtime's arena keeps them mapped between calls (arena off is 1.4x slower there), with no ``LD_PRELOAD``:
``onnxruntime`` is a declared dependency. It is also the path that degrades least when a neighbour takes a core
(~2x, where eager PyTorch's per-op OpenMP barriers made it 3-15x slower). If the export or the session fails, or
its outputs disagree with PyTorch on a small probe, ``"auto"`` logs why and falls back to fused channels_last
eager. On a GPU ``"auto"`` is channels_last eager.

Outputs match eager fp32 of the original module (max |diff| <= 1e-3 on logits, argmax agreement >= 99.9 %);
:func:`check_parity` measures that and raises :class:`ParityError` otherwise.

The export is ~1 s and the session ~0.1 s; a ``Predictor`` makes them once and keeps the session.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from segmentation.models import fuse_bn

__all__ = ["BACKENDS", "DEFAULT_CPU_BACKEND", "ParityError", "Predictor", "check_parity", "create_session"]

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "channels_last", "onnxruntime")
DEFAULT_CPU_BACKEND = "onnxruntime"
FALLBACK_BACKEND = "channels_last"
PARITY_ATOL = 1e-3
PARITY_MIN_AGREEMENT = 0.999
PARITY_SIZES = ((64, 128), (65, 97))
_PROBE_SIZE = (64, 128)  # the size of the parity probe run when "auto" builds an ONNX Runtime session
_DIMS = {0: "batch", 2: "height", 3: "width"}


class ParityError(ValueError):
    """An optimised or exported path disagrees with eager fp32 beyond the tolerance; ``result`` holds the numbers."""

    def __init__(self, message: str, result: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def _export_onnx(model: nn.Module, opset: int = 17) -> bytes:
    """ONNX bytes of an eval-mode ``model``, dynamic batch/height/width (input ``image``, output ``logits``)."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The model's Python input checks become constants in the trace; the Predictor checks inputs itself.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # dynamo=False on purpose: the TorchScript exporter takes ~1 s here (the dynamo one 10-20 s) and keeps H x W
        # dynamic through the align_corners resizes without dynamic_shapes; its deprecation notice is expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, *_PROBE_SIZE),), buffer, opset_version=opset,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": _DIMS, "logits": _DIMS}, dynamo=False)
    return buffer.getvalue()


def create_session(onnx_model: bytes | str | Path, num_threads: int | None = None):
    """An ONNX Runtime CPU session tuned for this model: all graph optimisations, ``num_threads`` intra-op threads
    (default: ``torch.get_num_threads()``), one inter-op thread, and the CPU memory arena on (it keeps large
    activations mapped between calls instead of page-faulting them in on every forward).

    Args:
        onnx_model: serialized model bytes or a path to an ``.onnx`` file.
        num_threads: intra-op threads.

    Returns:
        An ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = True
    if isinstance(onnx_model, Path):
        onnx_model = str(onnx_model)
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class Predictor:
    """Fast, numerically unchanged inference for a segmentation network.

    Args:
        model: the network (train or eval mode; it is not modified: BatchNorm is folded into a copy).
        backend: ``"auto"`` (ONNX Runtime on a CPU, falling back to channels_last; channels_last on a GPU) or one
            of :data:`BACKENDS`.
        num_threads: intra-op threads for ONNX Runtime (default: ``torch.get_num_threads()``).

    Raises:
        ValueError: unknown ``backend``, or ``"onnxruntime"`` for a model that is not on the CPU.

    Shape:
        - Input: ``(N, 3, H, W)`` float, normalised as in :mod:`segmentation.models.preprocessing`; any
          ``H, W`` the model accepts (FC-HarDNet: >= 64).
        - :meth:`logits` output: ``(N, C, H, W)`` float32; :meth:`predict` output: ``(N, H, W)`` int64.

    Example:
        >>> predictor = Predictor(FCHarDNet(num_classes=19))
        >>> predictor.predict(torch.zeros(1, 3, 64, 128)).shape
        torch.Size([1, 64, 128])
    """

    def __init__(self, model: nn.Module, backend: str = "auto", num_threads: int | None = None) -> None:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown inference backend {backend!r}; allowed: auto, {', '.join(BACKENDS)}")
        self.device = _device(model)
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"backend 'onnxruntime' runs on the CPU, but the model is on {self.device}")
        self.num_threads = num_threads
        self._check_input = getattr(model, "check_input", None)
        self.module = fuse_bn(model)
        self.session = None
        if backend == "auto":
            backend = self._auto(model) if self.device.type == "cpu" else FALLBACK_BACKEND
        elif backend == "onnxruntime":
            self.session = create_session(_export_onnx(self.module), num_threads)
        if backend == "channels_last":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.backend = backend

    def _auto(self, model: nn.Module) -> str:
        self.backend = "onnxruntime"  # named in a ParityError message
        try:
            self.session = create_session(_export_onnx(self.module), self.num_threads)
            check_parity(self, model, sizes=(_PROBE_SIZE,), batch=1)
        except Exception as exc:  # any failure here only costs speed: fall back to PyTorch
            logger.warning("ONNX Runtime backend unavailable (%s: %s); using fused %s eager",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", FALLBACK_BACKEND)
            self.session = None
            return FALLBACK_BACKEND
        return "onnxruntime"

    def _validate(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Predictor expects an (N, 3, H, W) tensor, got {found}")
        if self._check_input is not None:
            self._check_input(x)
        return x.detach().to(self.device, torch.float32)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validate(x)
        if self.session is not None:
            (out,) = self.session.run(None, {"image": x.contiguous().cpu().numpy()})
            return torch.from_numpy(out)
        if self.backend == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.module(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (``N x C x H x W`` float32, contiguous NCHW) of a normalised batch."""
        return self._forward(x).contiguous()

    __call__ = logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class ids (``N x H x W`` int64): the argmax of the logits."""
        return self._forward(x).argmax(1)

    def __repr__(self) -> str:
        return f"Predictor(backend={self.backend!r}, device={self.device})"


def check_parity(predictor: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module,
                 sizes: Sequence[tuple[int, int]] = PARITY_SIZES, batch: int = 2, atol: float = PARITY_ATOL,
                 min_agreement: float = PARITY_MIN_AGREEMENT, seed: int = 0, rtol: float = 1e-5) -> dict:
    """Compare ``predictor`` with eager fp32 ``reference`` (in eval mode) on seeded random inputs.

    The logit tolerance is ``atol + rtol * max|logit|``: fp32 sums over thousands of products differ in the last
    bits between two correct implementations, so a barely trained model whose logits reach the hundreds can show a
    1e-3 absolute difference that is a 1e-6 relative one. For a trained model (|logits| < ~50) it is ``atol``.
    :func:`segmentation.export.verify_onnx` applies the same check to an exported ONNX file.

    Args:
        predictor: the path under test (anything callable returning logits, e.g. a :class:`Predictor`); its
            ``repr`` names it in the error message.
        reference: the original, unfused module; its train/eval mode is restored afterwards.
        sizes: ``(H, W)`` input sizes to try.
        batch: batch size of each input.
        atol: largest allowed max |diff| on logits (plus ``rtol`` x the largest |logit|).
        min_agreement: smallest allowed fraction of pixels with the same argmax, at every size.
        seed: seed of the random inputs (given in the error message, to reproduce a failure).
        rtol: relative part of the logit tolerance.

    Returns:
        ``{"max_abs_diff", "argmax_agreement", "max_abs_logit"}``, the worst over ``sizes``.

    Raises:
        ParityError: a shape differs, or either tolerance is exceeded; the message gives the numbers per size.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = reference.training
    reference.eval()
    worst_diff, worst_agreement, scale, per_size = 0.0, 1.0, 0.0, []
    try:
        for height, width in sizes:
            x = torch.randn(batch, 3, height, width, generator=generator).to(_device(reference))
            with torch.inference_mode():
                expected = reference(x).float().cpu()
                got = predictor(x).float().cpu()
            if got.shape != expected.shape:
                raise ParityError(f"{predictor!r}: output shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                                  f"eager gives {tuple(expected.shape)} (were the dynamic axes exported?)")
            diff = (got - expected).abs().max().item()
            agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
            worst_diff, worst_agreement = max(worst_diff, diff), min(worst_agreement, agreement)
            scale = max(scale, expected.abs().max().item())
            per_size.append(f"{height}x{width}: max|diff| {diff:.3g}, argmax agreement {agreement:.5f}")
    finally:
        reference.train(was_training)
    result = {"max_abs_diff": worst_diff, "argmax_agreement": worst_agreement, "max_abs_logit": scale}
    allowed = atol + rtol * scale
    if not worst_diff <= allowed or worst_agreement < min_agreement:  # "not <=" also catches NaN
        raise ParityError(f"{predictor!r} disagrees with eager fp32 (seed {seed}): max|diff| {worst_diff:.3g} "
                          f"(allowed {allowed:.3g} = {atol:g} + {rtol:g} x max|logit| {scale:.3g}), argmax agreement "
                          f"{worst_agreement:.5f} (required {min_agreement:g}); per size: " + "; ".join(per_size),
                          result)
    return result
