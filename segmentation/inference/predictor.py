"""The deployed inference path: one :class:`Predictor` used by evaluate, predict, export checks and serving.

A ``Predictor`` wraps a trained network (any ``nn.Module`` returning ``N x C x H x W`` logits) with BatchNorm folded
into the convolutions, or an exported ONNX file, and runs it on one of three backends:

- ``"eager"``: the fused PyTorch module, NCHW;
- ``"channels_last"``: the fused module with weights and input in channels_last (NHWC) memory format;
- ``"onnxruntime"``: the fused module exported in-process to ONNX and run by the sessions of
  :func:`segmentation.inference.onnx.create_session`, one for logits and one for class ids (the only choice for an
  ONNX file).

Why ``"auto"`` (the default everywhere) picks ONNX Runtime on a CPU (``python -m benchmarks.inference``; numbers and
caveats in ``benchmarks/RESULTS.md``): it was the fastest FC-HarDNet path, or within noise of it, in every run, and
the only one whose 1024x2048 time stays near 4x its 512x1024 time. PyTorch eager allocates every activation afresh;
at 1024x2048 those buffers exceed glibc's mmap threshold, so each forward page-faults hundreds of MB back in. ONNX
Runtime's arena keeps them mapped between calls. If the export or the session fails, or its outputs disagree with
PyTorch on a small probe (:func:`segmentation.inference.parity.check_parity`), ``"auto"`` logs why and falls back
to fused channels_last eager. On a GPU ``"auto"`` is channels_last eager.

Masks: on ONNX Runtime, :meth:`Predictor.predict_mask` runs a second session of the same graph whose only output is
``class_ids`` (an ArgMax appended to the graph, :func:`segmentation.inference.onnx.add_class_ids`, computed
channels-last by :func:`segmentation.inference.onnx.one_output_graph`; checked against the logits on a probe), so
the ``C`` float planes of the logits are never upsampled to full size in NCHW nor leave the runtime;
``torch.argmax`` over ``(1, C, H, W)`` logits cost about as much as the network at 1024x2048. The logits session, in
turn, has no ArgMax. Test-time augmentation and sliding windows average logits, so they keep taking the argmax in
PyTorch.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segmentation.data.classes import ClassInfo
from segmentation.inference.onnx import (
    CLASS_IDS_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    create_session,
    export_onnx,
    output_names,
)
from segmentation.inference.parity import check_parity, model_device
from segmentation.inference.tta import DEFAULT_SCALES, check_tta_settings, pad_to_min_side, predict_logits
from segmentation.models import fuse_bn
from segmentation.models.package import ONNX_FILE, load_model_package, read_package_meta
from segmentation.models.preprocessing import to_input_tensor

logger = logging.getLogger(__name__)

BACKENDS = ("eager", "channels_last", "onnxruntime")
BACKEND_CHOICES = ("auto", *BACKENDS)
DEFAULT_BACKEND = "auto"
FALLBACK_BACKEND = "channels_last"
_PROBE_SIZE = (64, 128)  # the size of the parity probe run when "auto" builds an ONNX Runtime session


class Predictor:
    """Fast, numerically unchanged inference for a segmentation network.

    Args:
        model: the network (train or eval mode; it is not modified: BatchNorm is folded into a copy).
        backend: ``"auto"`` or one of :data:`BACKENDS`.
        num_threads: intra-op threads for ONNX Runtime (default: ``torch.get_num_threads()``).

    Raises:
        ValueError: unknown ``backend``, or ``"onnxruntime"`` for a model that is not on the CPU.

    Shape:
        - :meth:`logits` input: ``(N, 3, H, W)`` float, normalised as in :mod:`segmentation.models.preprocessing`;
          any ``H, W`` the model accepts (FC-HarDNet: >= 64).
        - :meth:`logits` output: ``(N, C, H, W)`` float32; :meth:`class_ids`: ``(N, H, W)`` uint8;
          :meth:`predict_mask`: ``(H, W)`` uint8 for one image.

    Example:
        >>> predictor = Predictor(FCHarDNet(num_classes=19))
        >>> predictor.predict_mask(np.zeros((40, 50, 3), np.uint8)).shape
        (40, 50)
    """

    def __init__(
        self, model: nn.Module | None, backend: str = DEFAULT_BACKEND, num_threads: int | None = None
    ) -> None:
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown inference backend {backend!r}; allowed: {', '.join(BACKEND_CHOICES)}")
        self.num_threads = num_threads
        self.session = None  # ONNX Runtime: the logits session
        self.ids_session = None  # ... and the class-ids session (None: masks take the argmax of the logits)
        self.module = None
        self.backend = backend
        if model is None:  # from_onnx fills in the session
            self.device = torch.device("cpu")
            return
        self.device = model_device(model)
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"backend 'onnxruntime' runs on the CPU, but the model is on {self.device}")
        self._check_input = getattr(model, "check_input", None)
        self.module = fuse_bn(model)
        if backend == "auto":
            backend = self._auto(model) if self.device.type == "cpu" else FALLBACK_BACKEND
        elif backend == "onnxruntime":
            self._use_onnx(export_onnx(self.module, fuse_bn=False))
        if backend == "channels_last":
            self.module = self.module.to(memory_format=torch.channels_last)
        self.backend = backend

    @classmethod
    def from_onnx(cls, path: str | Path, num_threads: int | None = None) -> Predictor:
        """A predictor running an exported ``.onnx`` file on onnxruntime (CPU)."""
        predictor = cls(None, "onnxruntime", num_threads)
        predictor._check_input = None
        predictor._use_onnx(Path(path).read_bytes())
        return predictor

    def _use_onnx(self, onnx_model: bytes) -> None:
        """The two sessions of a serialized graph (ONNX Runtime runs every node of a session whatever outputs a run
        asks for): logits without the class-id ArgMax, and class ids without the full-size logits."""
        names = output_names(onnx_model)
        self.session = _logits_session(onnx_model, self.num_threads, names)
        self.ids_session = _class_ids_session(onnx_model, self.num_threads, self.session, names)

    def _auto(self, model: nn.Module) -> str:
        self.backend = "onnxruntime"  # named in a ParityError message
        try:
            self._use_onnx(export_onnx(self.module, fuse_bn=False))
            check_parity(self, model, sizes=(_PROBE_SIZE,), batch=1)
        except Exception as exc:  # any failure here only costs speed: fall back to PyTorch
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            logger.warning(
                "ONNX Runtime backend unavailable (%s: %s); using fused %s eager",
                type(exc).__name__,
                first_line,
                FALLBACK_BACKEND,
            )
            self.session = self.ids_session = None
            return FALLBACK_BACKEND
        return "onnxruntime"

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Predictor expects an (N, 3, H, W) tensor, got {found}")
        if self._check_input is not None:
            self._check_input(x)
        return x.detach().to(self.device, torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (``N x C x H x W`` float32, contiguous NCHW) of a normalised batch."""
        x = self._check(x)
        if self.session is not None:
            (out,) = self.session.run([_logits_output(self.session)], {INPUT_NAME: x.contiguous().cpu().numpy()})
            return torch.from_numpy(out)
        if self.backend == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.module(x).contiguous()

    __call__ = logits

    def class_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Class ids (``N x H x W`` uint8, the first index among tied maxima) of a normalised batch: computed
        inside ONNX Runtime by :attr:`ids_session` when there is one, else the argmax of :meth:`logits`."""
        if self.ids_session is not None:
            x = self._check(x)
            (out,) = self.ids_session.run([CLASS_IDS_NAME], {INPUT_NAME: x.contiguous().cpu().numpy()})
            return torch.from_numpy(out)
        with torch.inference_mode():
            return self.logits(x).argmax(1).to(torch.uint8)

    def predict_class_ids(
        self,
        batch: torch.Tensor,
        *,
        tta: str = "none",
        scales: Sequence[float] = DEFAULT_SCALES,
        sliding_window: int = 0,
    ) -> torch.Tensor:
        """Class ids (``N x H x W``) of a normalised batch at its own size, what evaluation scores and serving returns.

        Without test-time augmentation, and when the batch fits one window, they come from the class-ids session
        (uint8) where there is one; otherwise they are the argmax (int64) of the averaged logits of
        :func:`~segmentation.inference.tta.predict_logits`. Both pick the first of tied maxima.
        """
        check_tta_settings(tta, scales, sliding_window)
        height, width = batch.shape[-2:]
        padded = pad_to_min_side(batch)
        one_window = not sliding_window or max(padded.shape[-2:]) <= sliding_window
        if tta == "none" and one_window and self.ids_session is not None:
            return self.class_ids(padded)[:, :height, :width]
        with torch.inference_mode():
            return predict_logits(self, batch, tta=tta, scales=scales, sliding_window=sliding_window).argmax(1)

    def predict_mask(
        self,
        image_bgr: np.ndarray,
        *,
        tta: str = "none",
        scales: Sequence[float] = DEFAULT_SCALES,
        sliding_window: int = 0,
    ) -> np.ndarray:
        """Class ids (``H x W`` uint8) of one ``H x W x 3`` uint8 BGR image of any size (see
        :meth:`predict_class_ids`, which checks the TTA settings before the network runs)."""
        batch = to_input_tensor(image_bgr).to(self.device)
        ids = self.predict_class_ids(batch, tta=tta, scales=scales, sliding_window=sliding_window)[0]
        return np.ascontiguousarray(ids.to(torch.uint8).cpu().numpy())

    def __repr__(self) -> str:
        return f"Predictor(backend={self.backend!r}, device={self.device})"


def _logits_session(onnx_model: bytes, num_threads: int | None, names: list[str]):
    """A session of the graph for :meth:`Predictor.logits`: its ``logits`` output alone when it has one (the
    class-id ArgMax would run on every call otherwise), else every output (``names``: the graph's outputs)."""
    only = OUTPUT_NAME if OUTPUT_NAME in names else None
    return create_session(onnx_model, num_threads, only=only)


def _class_ids_session(onnx_model: bytes, num_threads: int | None, logits_session, names: list[str]):
    """The session for masks: the graph's ``class_ids`` alone (:func:`~segmentation.inference.onnx.one_output_graph`),
    checked on a probe against the argmax of ``logits_session``'s logits. ``None`` for a graph without class ids, and
    with a warning when the session cannot be made or disagrees: masks then take the argmax of the logits (the same
    class ids, slower)."""
    if CLASS_IDS_NAME not in names:
        return None
    try:
        session = create_session(onnx_model, num_threads, only=CLASS_IDS_NAME)
        channels = logits_session.get_inputs()[0].shape[1]
        probe = np.random.default_rng(0).standard_normal(
            (1, channels if isinstance(channels, int) else 3, *_PROBE_SIZE), dtype=np.float32
        )
        (logits,) = logits_session.run([_logits_output(logits_session)], {INPUT_NAME: probe})
        (ids,) = session.run([CLASS_IDS_NAME], {INPUT_NAME: probe})
        if not np.array_equal(ids, logits.argmax(1)):
            differ = int((ids != logits.argmax(1)).sum())
            raise ValueError(f"its class ids differ from the argmax of the logits on {differ} probe pixels")
        return session
    except Exception as exc:  # only costs speed
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        logger.warning(
            "class-ids session unavailable (%s: %s); masks take the argmax of the logits",
            type(exc).__name__,
            first_line,
        )
        return None


def _logits_output(session) -> str:
    """The session's logits output: ``logits`` in every file this project exports, else an ONNX file's first output."""
    names = [output.name for output in session.get_outputs()]
    return OUTPUT_NAME if OUTPUT_NAME in names else names[0]


def load_predictor(package: str | Path, backend: str = DEFAULT_BACKEND) -> tuple[Predictor, ClassInfo]:
    """A :class:`Predictor` for a model package (:mod:`segmentation.models.package`) and its classes.

    An ONNX package always runs on onnxruntime; ``backend`` chooses the path of a PyTorch package.
    """
    meta = read_package_meta(package)
    if meta.get("backend") == "onnx":
        return Predictor.from_onnx(Path(package) / ONNX_FILE), ClassInfo.from_dict(meta["classes"])
    model, classes = load_model_package(package)
    return Predictor(model, backend), classes


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. ``NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC ... (2 threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    return f"{device.type}: {cpu} ({torch.get_num_threads()} threads)"
