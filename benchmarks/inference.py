"""Inference speed of FC-HarDNet-70 per execution path, next to torchvision's mobile segmentation models.

Run: ``python -m benchmarks.inference`` (``--no-compile`` skips torch.compile, ``--no-peers`` the torchvision
models, ``--key-rows`` keeps only the rows the mask targets need, ``--sizes 512x1024``, ``--profile 1024x2048``
prints the top ops of the deployed path and of fused channels_last eager instead, ``--padding-ab`` times the deployed
logits session with channels padded to 0, 8 and 16 in turn, ``--padding-ab --int8`` the same on the default INT8
file).

Besides logits, the masks users get are timed on a street image (the Cityscapes sample when present): unfused eager
logits again (the reference, timed beside the others), the served pyfunc in-process (base64 PNG in, base64 PNG out),
the deployed ``Predictor.predict_mask`` (class ids computed inside ONNX Runtime by a session without the logits
output), the same network with the argmax taken in PyTorch as before, and the class-id step alone (ArgMax + Cast on
``1 x H x W x C`` scores in ONNX Runtime, as the deployed session computes them). Their masks must equal the
argmax of eager fp32 logits (where two class scores tie within float rounding, either class).

The ``onnxruntime`` rows run the exported graph's logits unpadded (before 2026-12-07 late, the whole exported graph,
class-id ArgMax included); the deployed Predictor's logits session also pads convolutions with zero channels where
the CPU calls for it (to 8 channels on AVX2 CPUs, to 16 on AVX-512 CPUs:
:mod:`segmentation.inference.channel_padding`), so the two rows side by side show what the padding gains.

Batch 1, fp32, torch's default threads. Every optimised path is compared with eager fp32 NCHW of the same model on
the same input (max |diff| <= 1e-3 on logits, argmax >= 99.9 %); a mismatch fails the run after the table is
printed. Conv GFLOP/s counts 2 x the convolutions' multiply-adds (from forward hooks on a meta-device copy) and is
compared with the fp32 GEMM rate measured in the same run (benchmarks.ceilings: the faster of torch's and ONNX
Runtime's). The served targets compare with the faster of the run's two eager NCHW timings at 512x1024. Rows whose
process got less than
85 % of its threads' CPU time (the machine is shared) are measured again, up to twice.
"""

from __future__ import annotations

import argparse
import base64
import copy
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from benchmarks import ceilings
from benchmarks.common import describe_machine, markdown_table, time_fn, write_results
from benchmarks.serving import street_image
from segmentation.data.synthetic import generate_scene
from segmentation.inference.channel_padding import configured_block, cpu_flags, pad_channels, padding_block
from segmentation.inference.onnx import (
    EXECUTION_PROVIDERS,
    create_session,
    inline_shared_initializers,
    one_output_graph,
)
from segmentation.inference.onnx import export_onnx as export_onnx_bytes
from segmentation.inference.parity import check_parity
from segmentation.inference.predictor import Predictor
from segmentation.inference.quantize import default_int8_exclusions, quantize_int8
from segmentation.models import FCHarDNet, fuse_bn
from segmentation.models.package import save_onnx_package
from segmentation.models.preprocessing import to_input_tensor

SIZES = ((512, 1024), (1024, 2048))
# Medians of this many repeats: on a shared VM single repeats stray by 10-40 %, so fewer let one slow burst decide.
REPEATS = {(512, 1024): 9, (1024, 2048): 5}
# torch.compile specialises on the input shape and takes 1-2 min per shape here: one size shows what it gains.
COMPILE_SIZES = {(512, 1024)}
MIN_CPU_SHARE = 0.85
# fp32 masks may differ from eager's argmax only where eager's best two class scores are within twice the logits
# tolerance (1e-3, each score may move by that much), and on at most this share of the pixels.
MASK_TIE = 2e-3
MASK_MIN_AGREEMENT = 0.9999
INT8_SERVED = "mask: served pyfunc INT8 (random weights), PNG in/out"
RETRIES = 2
COLUMNS = [
    "model",
    "path",
    "input",
    "median_ms",
    "min_ms",
    "max_ms",
    "img/s",
    "cpu_share",
    "conv GFLOP/s",
    "% of GEMM",
    "speedup vs eager",
    "large/small time",
    "mem MiB",
    "max|diff|",
    "argmax agree",
]

# The logits rows the deployed path is compared with (the torchvision peers are other networks).
LOGITS_PATHS = (
    "eager NCHW",
    "eager channels_last",
    "BN-fused NCHW",
    "BN-fused channels_last",
    "onnxruntime, arena off",
    "onnxruntime",
    "torch.compile (fused, channels_last)",
)


class PeakRss:
    """Peak resident memory (MiB) above the level at entry, sampled every few ms by a background thread."""

    def __enter__(self) -> PeakRss:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def isa_line() -> str:
    """The vector/matrix extensions of this CPU that matter for fp32 and INT8 inference, from /proc/cpuinfo."""
    flags = cpu_flags()
    if not flags:
        return "CPU ISA: unknown (no /proc/cpuinfo)"
    found = {
        "AVX2": "avx2" in flags,
        "AVX-512": "avx512f" in flags,
        "VNNI": bool({"avx512_vnni", "avx_vnni"} & flags),
        "AVX512-BF16": "avx512_bf16" in flags,
        "AMX": bool({"amx_tile", "amx_int8", "amx_bf16"} & flags),
    }
    return "CPU ISA: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in found.items())


def isa_tag() -> str:
    """A short name of the vector ISA here that fp32 and INT8 speed depend on, for results files:
    ``amx``, ``avx512_vnni``, ``avx512``, ``avx2_vnni``, ``avx2`` or ``other``."""
    flags = cpu_flags()
    if "amx_int8" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512_vnni" if "avx512_vnni" in flags else "avx512"
    if "avx2" in flags:
        return "avx2_vnni" if "avx_vnni" in flags else "avx2"
    return "other"


def conv_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds of every Conv2d for one input of ``shape``, from shapes alone (a meta-device copy)."""
    total = 0

    def hook(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]  # (Cin/groups) x kh x kw
        total += output.numel() * kernel

    meta = copy.deepcopy(model).eval().to("meta")
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    for handle in handles:
        handle.remove()
    return total


class Logits(nn.Module):
    """torchvision segmentation models return {"out": logits}; the benchmark compares tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def channels_last(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model = model.to(memory_format=torch.channels_last)
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def onnx_session(model: nn.Module, arena: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported graph's logits (no class-id ArgMax, as in the deployed logits session) in a plain session: the
    deployed row differs from the arena row by this CPU's channel padding alone."""
    onnx_model = export_onnx_bytes(fuse_bn(model))
    session = create_session(onnx_model, channel_block=0, only="logits")
    if not arena:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.enable_cpu_mem_arena = False
        logits_only = one_output_graph(onnx.load_from_string(onnx_model), "logits").SerializeToString()
        session = ort.InferenceSession(logits_only, options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def hardnet_paths(model: nn.Module, compile_model: bool) -> dict[str, Callable[[], Callable]]:
    """Path name -> a builder (timed separately: export/compile cost) of ``fn(x) -> logits``."""

    def compiled() -> Callable:
        fn = torch.compile(fuse_bn(model).to(memory_format=torch.channels_last))
        return lambda x: fn(x.contiguous(memory_format=torch.channels_last))

    paths = {
        "eager NCHW": lambda: model,
        "eager channels_last": lambda: channels_last(copy.deepcopy(model)),
        "BN-fused NCHW": lambda: fuse_bn(model),
        "BN-fused channels_last": lambda: channels_last(fuse_bn(model)),
        "onnxruntime, arena off": lambda: onnx_session(model, arena=False),
        "onnxruntime": lambda: onnx_session(model, arena=True),
        "deployed Predictor": lambda: Predictor(model).logits,
    }
    if compile_model:
        paths["torch.compile (fused, channels_last)"] = compiled
    return paths


def measure(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> tuple[dict, torch.Tensor]:
    """Time ``fn(x)``; the warm-up output is returned for the parity check. Reruns rows that lacked CPU."""
    best = None
    for _ in range(1 + RETRIES):
        with torch.inference_mode(), PeakRss() as memory:
            start = time.perf_counter()
            out = fn(x)  # warm-up (also compiles / fills the arena)
            first_call_s = time.perf_counter() - start
            timing = time_fn(lambda: fn(x), warmup=0, repeats=repeats)
        timing.update({"mem MiB": memory.mib, "first_call_s": first_call_s})
        if best is None or timing["cpu_share"] > best["cpu_share"]:
            best = timing
        if timing["cpu_share"] >= MIN_CPU_SHARE:
            break
    return best, out


def bench_model(
    name: str, model: nn.Module, paths: dict[str, Callable[[], Callable]], sizes, gemm: float, failures: list[str]
) -> list[dict]:
    rows = []
    for height, width in sizes:
        x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        macs = conv_macs(model, tuple(x.shape))
        reference = None
        for path, build in paths.items():
            if path.startswith("torch.compile") and (height, width) not in COMPILE_SIZES:
                continue
            start = time.perf_counter()
            fn = build()
            build_s = time.perf_counter() - start
            timing, out = measure(fn, x, REPEATS.get((height, width), 3))
            row = {
                "model": name,
                "path": path,
                "input": f"{height}x{width}",
                **timing,
                "build_s": build_s,
                "img/s": 1000 / timing["median_ms"],
                "conv GMACs": macs / 1e9,
                "conv GFLOP/s": 2 * macs / timing["median_ms"] / 1e6,
            }
            row["% of GEMM"] = 100 * row["conv GFLOP/s"] / gemm
            if reference is None:
                reference, eager_ms = out.float(), timing["median_ms"]
            diff = (out.float() - reference).abs().max().item()
            agree = (out.argmax(1) == reference.argmax(1)).float().mean().item()
            row.update({"max|diff|": diff, "argmax agree": agree, "speedup vs eager": eager_ms / timing["median_ms"]})
            if not diff <= 1e-3 or agree < 0.999:
                failures.append(f"{name} {path} {height}x{width}: max|diff| {diff:.3g}, argmax agreement {agree:.5f}")
            rows.append(row)
            print(
                f"  {name:<24} {path:<38} {height}x{width}: {timing['median_ms']:.0f} ms "
                f"(cpu_share {timing['cpu_share']:.2f}, build {build_s:.1f} s)",
                flush=True,
            )
            del fn, out
    return rows


def _class_id_step(num_classes: int) -> onnx.ModelProto:
    """The deployed class-id step alone: ArgMax over the class axis of channels-last scores and the cast to uint8,
    what the class-ids session runs after its upsampling (:func:`segmentation.inference.onnx.one_output_graph`)."""
    scores = onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, "height", "width", num_classes])
    ids = onnx.helper.make_tensor_value_info("class_ids", onnx.TensorProto.UINT8, [1, "height", "width"])
    nodes = [
        onnx.helper.make_node("ArgMax", ["scores"], ["class_ids_int64"], axis=3, keepdims=0),
        onnx.helper.make_node("Cast", ["class_ids_int64"], ["class_ids"], to=onnx.TensorProto.UINT8),
    ]
    graph = onnx.helper.make_graph(nodes, "class_id_step", [scores], [ids])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def default_int8(fp32: bytes | Path, path: Path) -> Path:
    """The export step's default INT8 file of an fp32 network, written to ``path``. Speed does not depend on what
    calibrates the ranges: street scenes stand in for training images."""
    scenes = [generate_scene(256, 512, seed)[0] for seed in range(4)]
    return quantize_int8(fp32, scenes, path, default_int8_exclusions(fp32))


def mask_paths(model: nn.Module) -> dict[str, Callable[[np.ndarray], Callable[[], object]]]:
    """Path name -> a builder that, given one BGR image, returns ``fn() -> mask`` (the served path: a response)."""
    import pandas as pd

    from segmentation.config import ModelConfig
    from segmentation.data.classes import ClassInfo
    from segmentation.mlops.serving import SegmentationModel
    from segmentation.mlops.serving_requests import IMAGE_COLUMN, encode_image
    from segmentation.models.package import save_model_package

    def deployed(image: np.ndarray) -> Callable[[], object]:
        predictor = Predictor(model)
        return lambda: predictor.predict_mask(image)

    def torch_argmax(image: np.ndarray) -> Callable[[], object]:
        predictor, x = Predictor(model), to_input_tensor(image)
        return lambda: predictor.logits(x).argmax(1)[0].to(torch.uint8).numpy()

    def class_id_step(image: np.ndarray) -> Callable[[], object]:
        logits = Predictor(model).logits(to_input_tensor(image)).numpy()
        scores = np.ascontiguousarray(logits.transpose(0, 2, 3, 1))
        session = create_session(_class_id_step(logits.shape[1]).SerializeToString())
        return lambda: session.run(["class_ids"], {"scores": scores})[0][0]

    def served(image: np.ndarray) -> Callable[[], object]:
        with tempfile.TemporaryDirectory() as tmp:
            save_model_package(model, ClassInfo.cityscapes(), ModelConfig(), tmp)
            pyfunc = SegmentationModel().setup(tmp)
        request = pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})
        return lambda: pyfunc.predict(None, request)

    def served_int8(image: np.ndarray) -> Callable[[], object]:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_onnx_bytes(model, fp32)
            int8 = default_int8(fp32, Path(tmp) / "int8.onnx")
            package = save_onnx_package(
                int8, ClassInfo.cityscapes(), ModelConfig(), Path(tmp) / "pkg", EXECUTION_PROVIDERS
            )
            pyfunc = SegmentationModel().setup(package)
        request = pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})
        return lambda: pyfunc.predict(None, request)

    def eager_logits(image: np.ndarray) -> Callable[[], object]:
        x = to_input_tensor(image)
        return lambda: model(x)

    return {
        "mask: eager NCHW logits (reference)": eager_logits,
        "mask: served pyfunc, PNG in/out": served,
        "mask: deployed predict_mask": deployed,
        "mask: deployed logits + torch argmax": torch_argmax,
        "mask: class-id step alone": class_id_step,
        INT8_SERVED: served_int8,
    }


def _as_mask(out: object) -> np.ndarray:
    if isinstance(out, torch.Tensor) and out.dim() == 4:  # logits
        return out.argmax(1)[0].numpy()
    if hasattr(out, "columns"):  # a served response: base64 PNG of class ids
        return cv2.imdecode(np.frombuffer(base64.b64decode(out["mask"][0]), np.uint8), cv2.IMREAD_UNCHANGED)
    return np.asarray(out)


def _mask_mismatch(mask: np.ndarray, reference: np.ndarray, expected: np.ndarray, agree: float) -> str | None:
    """Why ``mask`` is not eager's argmax (``expected`` of the ``C x H x W`` ``reference`` logits), or ``None``.

    Another summation order may flip a pixel whose two best classes tie within float rounding: such pixels may
    differ while at least :data:`MASK_MIN_AGREEMENT` of the image agrees; never a pixel whose chosen class scores
    clearly lower, and never an id that is not a class.
    """
    if mask.shape != expected.shape:
        return f"mask of shape {mask.shape}, expected {expected.shape}"
    if mask.min() < 0 or mask.max() >= reference.shape[0]:
        return f"class ids {mask.min()}..{mask.max()} outside 0..{reference.shape[0] - 1}"
    best = np.take_along_axis(reference, expected[None], 0)
    chosen = np.take_along_axis(reference, mask[None], 0)
    gap = float((best - chosen).max())
    if not (gap <= MASK_TIE and agree >= MASK_MIN_AGREEMENT):  # NaN logits fail here too
        return (
            f"mask agreement {agree:.6f} (at least {MASK_MIN_AGREEMENT} needed), a chosen class scoring {gap:.2g} "
            f"below the best (only ties within {MASK_TIE:g} may differ)"
        )
    return None


def bench_masks(model: nn.Module, sizes, rows: list[dict], failures: list[str]) -> list[dict]:
    """Time the mask paths at each size; each fp32 mask must equal the argmax of eager fp32 logits except where
    the best two scores tie within :data:`MASK_TIE`."""
    eager = {r["input"]: r["median_ms"] for r in rows if r["model"] == "FC-HarDNet" and r["path"] == "eager NCHW"}
    out_rows = []
    for height, width in sizes:
        image = street_image(height, width)
        with torch.inference_mode():
            reference = model.eval()(to_input_tensor(image))[0].numpy()
        expected = reference.argmax(0)
        for path, build in mask_paths(model).items():
            start = time.perf_counter()
            fn = build(image)
            build_s = time.perf_counter() - start
            timing, out = measure(lambda _, fn=fn: fn(), None, REPEATS.get((height, width), 3))
            mask = _as_mask(out).astype(np.int64)
            agree = float((mask == expected).mean())
            if path != INT8_SERVED:  # INT8 computes another function: its agreement is reported, not checked
                problem = _mask_mismatch(mask, reference, expected, agree)
                if problem:
                    failures.append(f"FC-HarDNet {path} {height}x{width}: {problem}")
            size = f"{height}x{width}"
            out_rows.append(
                {
                    "model": "FC-HarDNet",
                    "path": path,
                    "input": size,
                    **timing,
                    "build_s": build_s,
                    "img/s": 1000 / timing["median_ms"],
                    "argmax agree": agree,
                    "speedup vs eager": eager[size] / timing["median_ms"] if size in eager else None,
                }
            )
            print(
                f"  FC-HarDNet {path:<38} {size}: {timing['median_ms']:.0f} ms (cpu_share {timing['cpu_share']:.2f})"
            )
    return out_rows


def add_scaling(rows: list[dict]) -> None:
    small = {(r["model"], r["path"]): r["median_ms"] for r in rows if r["input"] == "512x1024"}
    for row in rows:
        if row["input"] == "1024x2048" and (row["model"], row["path"]) in small:
            row["large/small time"] = row["median_ms"] / small[(row["model"], row["path"])]


def targets(rows: list[dict], gemm: float) -> list[dict]:
    """The issue's targets for the deployed path, each with the measured value and met / NOT met."""
    get = {(r["model"], r["path"], r["input"]): r for r in rows}
    out = []
    deployed = [get.get(("FC-HarDNet", "deployed Predictor", s)) for s in ("512x1024", "1024x2048")]
    eager = get.get(("FC-HarDNet", "eager NCHW", "512x1024"))
    if all(deployed):
        ratio = deployed[1]["median_ms"] / deployed[0]["median_ms"]
        out.append(
            {
                "target": "deployed: time(1024x2048) <= 4.2 x time(512x1024)",
                "value": f"{ratio:.2f}x",
                "met": ratio <= 4.2,
            }
        )
    if deployed[0] and eager:
        speedup = eager["median_ms"] / deployed[0]["median_ms"]
        out.append(
            {
                "target": "deployed >= 1.3x faster than unfused NCHW eager at 512x1024",
                "value": f"{speedup:.2f}x",
                "met": speedup >= 1.3,
            }
        )
    for row in filter(None, deployed):
        out.append(
            {
                "target": f"deployed conv FLOP rate >= 50% of GEMM ({gemm:.0f} GFLOP/s) at {row['input']}",
                "value": f"{row['% of GEMM']:.0f}%",
                "met": row["% of GEMM"] >= 50,
            }
        )
    # Without channel padding on this CPU the "onnxruntime" row runs the deployed session itself: not another path.
    same_session = set() if configured_block() else {"onnxruntime"}
    for row in filter(None, deployed):
        others = [
            r
            for r in rows
            if r["model"] == "FC-HarDNet"
            and r["input"] == row["input"]
            and r["path"] in LOGITS_PATHS
            and r["path"] not in same_session
        ]
        if others:
            best = min(others, key=lambda r: r["median_ms"])
            note = "; the onnxruntime row is the same session on this CPU (no padding)" if same_session else ""
            out.append(
                {
                    "target": f"deployed >= the best other logits row at {row['input']}",
                    "value": f"{row['median_ms']:.0f} ms vs {best['median_ms']:.0f} ms ({best['path']}{note})",
                    "met": row["median_ms"] <= best["median_ms"],
                }
            )
    for size in ("512x1024", "1024x2048"):
        step = get.get(("FC-HarDNet", "mask: class-id step alone", size))
        predict = get.get(("FC-HarDNet", "mask: deployed predict_mask", size))
        if step and predict:
            share = 100 * step["median_ms"] / predict["median_ms"]
            out.append(
                {
                    "target": f"class-id step <= 10% of deployed predict_mask at {size}",
                    "value": f"{share:.1f}% ({step['median_ms']:.0f} of {predict['median_ms']:.0f} ms)",
                    "met": share <= 10,
                }
            )
    served_int8 = get.get(("FC-HarDNet", INT8_SERVED, "512x1024"))
    served = get.get(("FC-HarDNet", "mask: served pyfunc, PNG in/out", "512x1024"))
    # Eager logits are timed twice in a run: in the logits table and beside the mask rows. The faster of the two is
    # the reference: a slower timing of the same network measures what else ran (a neighbour, or the memory and
    # threads an ONNX Runtime session just used: eager right after a session run took 1.3x its own time on a
    # 2-core VM), and a target must not be met thanks to it.
    eagers = [
        r for r in (eager, get.get(("FC-HarDNet", "mask: eager NCHW logits (reference)", "512x1024"))) if r is not None
    ]
    eager = min(eagers, key=lambda r: r["median_ms"]) if eagers else None
    both = " and ".join(f"{r['median_ms']:.0f}" for r in eagers)
    for name, row in (("served pyfunc", served), ("served INT8 pyfunc", served_int8)):
        if row and eager:
            speedup = eager["median_ms"] / row["median_ms"]
            out.append(
                {
                    "target": f"{name} (PNG in/out) >= 1.5x faster than unfused eager logits at 512x1024",
                    "value": f"{speedup:.2f}x ({row['median_ms']:.0f} vs {eager['median_ms']:.0f} ms; the faster of "
                    f"the run's eager timings: {both} ms)",
                    "met": speedup >= 1.5,
                }
            )
    for item in out:
        item["met"] = "met" if item["met"] else "NOT met"
    return out


def gemm_ceiling() -> dict:
    """fp32 GEMM GFLOP/s with torch's threads, the faster of torch's BLAS and ONNX Runtime's (benchmarks.ceilings),
    each remeasured while it lacked CPU. The returned row also holds every library's rate (``per library``)."""
    threads = torch.get_num_threads()
    best: dict[str, dict] = {}
    for library in ceilings.GEMM_LIBRARIES:
        rows = []
        for _ in range(1 + RETRIES):
            rows.append(ceilings.gemm_gflops(threads, library=library))
            torch.set_num_threads(threads)
            if rows[-1]["cpu_share"] >= MIN_CPU_SHARE:
                break
        best[library] = max(rows, key=lambda row: row["GFLOP/s (median)"])
    top = max(best.values(), key=lambda row: row["GFLOP/s (median)"])
    return {**top, "per library": {lib: round(row["GFLOP/s (median)"], 1) for lib, row in best.items()}}


def faster_ceiling(first: dict, second: dict) -> dict:
    """Per library the higher of two :func:`gemm_ceiling` measurements (a busy neighbour can only lower one), and the
    higher of the two rows overall."""
    top = max(first, second, key=lambda row: row["GFLOP/s (median)"])
    per_library = {
        lib: max(first["per library"].get(lib, 0.0), second["per library"].get(lib, 0.0))
        for lib in {*first["per library"], *second["per library"]}
    }
    return {**top, "per library": per_library}


KEY_PATHS = ("eager NCHW", "deployed Predictor")  # --key-rows: what the mask targets compare with


def run(
    sizes=SIZES, compile_model: bool = True, peers: bool = True, key_rows: bool = False
) -> tuple[list[dict], list[dict], dict]:
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

    gemm_row = gemm_ceiling()
    gemm = gemm_row["GFLOP/s (median)"]
    torch.manual_seed(0)
    failures: list[str] = []
    hardnet = FCHarDNet(num_classes=19).eval()
    check_parity(Predictor(hardnet), hardnet)  # odd sizes, batch 2: fails loudly before anything is timed
    paths = hardnet_paths(hardnet, compile_model)
    if key_rows:
        paths = {name: build for name, build in paths.items() if name in KEY_PATHS}
    rows = bench_model("FC-HarDNet", hardnet, paths, sizes, gemm, failures)
    rows += bench_masks(hardnet, sizes, rows, failures)
    factories = {
        "LR-ASPP MobileNetV3-L": lraspp_mobilenet_v3_large,
        "DeepLabV3 MobileNetV3-L": deeplabv3_mobilenet_v3_large,
    }
    for name, factory in factories.items() if peers else ():
        peer = Logits(factory(weights=None, weights_backbone=None, num_classes=19)).eval()
        paths = {
            "eager NCHW": lambda peer=peer: peer,
            "eager channels_last": lambda peer=peer: channels_last(copy.deepcopy(peer)),
        }
        rows += bench_model(name, peer, paths, sizes, gemm, failures)
    add_scaling(rows)
    # Measured again at the end: the higher of the two is the ceiling (a busy neighbour can only lower it).
    gemm_row = faster_ceiling(gemm_row, gemm_ceiling())
    if gemm_row["GFLOP/s (median)"] != gemm:
        gemm = gemm_row["GFLOP/s (median)"]
        for row in rows:
            if "conv GFLOP/s" in row:
                row["% of GEMM"] = 100 * row["conv GFLOP/s"] / gemm
    goals = targets(rows, gemm)
    extra = {"gemm": gemm_row, "targets": goals, "parity_failures": failures, "isa": isa_line()}
    return rows, goals, extra


def profile_top_ops(size: tuple[int, int], top: int = 15) -> str:
    """Top ops by self CPU time of fused channels_last eager (torch.profiler) and of the deployed masks session (ONNX
    Runtime, ``class_ids`` alone, as :class:`~segmentation.inference.predictor.Predictor` runs it)."""
    import json
    from collections import Counter

    model = FCHarDNet(num_classes=19).eval()
    x = torch.randn(1, 3, *size)
    fused = channels_last(fuse_bn(model))
    with torch.inference_mode():
        fused(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fused(x)
    text = f"### torch fused channels_last, {size[0]}x{size[1]}\n```\n"
    text += prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) + "\n```\n"
    with tempfile.TemporaryDirectory() as tmp:
        # The deployed session: BN folded, class ids in the graph, channels padded where this CPU calls for it.
        session = create_session(export_onnx_bytes(model), profile_prefix=os.path.join(tmp, "ort"), only="class_ids")
        for _ in range(3):
            session.run(None, {"image": x.numpy()})
        events = json.load(open(session.end_profiling()))
    per_op, runs = Counter(), [e["dur"] for e in events if e.get("name") == "model_run"]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 3
    total = sum(per_op.values())
    median = sorted(runs)[len(runs) // 2] / 1000
    text += f"### deployed masks session (ONNX Runtime), channel block {configured_block()}, {size[0]}x{size[1]}"
    text += f" (model_run median {median:.0f} ms)\n"
    text += "| op | ms per run | share of kernel time |\n|---|---|---|\n"
    text += "".join(f"| {op} | {us / 1000:.1f} | {100 * us / total:.1f}% |\n" for op, us in per_op.most_common(top))
    return text


def padding_ab(
    sizes: list[tuple[int, int]], blocks: tuple[int, ...] = (0, 8, 16), rounds: int = 7, int8: bool = False
) -> str:
    """Interleaved A/B of the deployed logits session with convolutions padded to each channel block (0: unpadded).

    One session per block on one exported network (random weights; with ``int8``, its default INT8 file,
    calibrated on street scenes), run in turn on the same input ``rounds`` times per size (each round in another
    order), so that a shared machine's slow spells hit every block alike. Logits must match the unpadded session's
    (max |diff| <= 1e-4), and each block must pad convolutions; else the run fails.
    """
    onnx_model = export_onnx_bytes(FCHarDNet(num_classes=19).eval())
    if int8:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_model = default_int8(onnx_model, Path(tmp) / "int8.onnx").read_bytes()
    for block in blocks:
        if block and not pad_channels(inline_shared_initializers(onnx.load_from_string(onnx_model)), block):
            raise SystemExit(f"padding to {block} channels changed no convolution: the A/B would time one graph twice")
    sessions = {block: create_session(onnx_model, channel_block=block, only="logits") for block in blocks}
    lines = [f"| input | {' | '.join(f'block {b} ms' for b in blocks)} | unpadded / best | max abs diff |", ""]
    lines[1] = "|" + "---|" * (len(blocks) + 3)
    for height, width in sizes:
        x = np.random.default_rng(0).standard_normal((1, 3, height, width), dtype=np.float32)
        logits = {block: session.run(None, {"image": x})[0] for block, session in sessions.items()}
        times: dict[int, list[float]] = {block: [] for block in blocks}
        for round_ in range(rounds):
            for block in blocks[round_ % len(blocks) :] + blocks[: round_ % len(blocks)]:
                session = sessions[block]
                start = time.perf_counter()
                session.run(None, {"image": x})
                times[block].append(1000 * (time.perf_counter() - start))
        medians = {block: float(np.median(values)) for block, values in times.items()}
        diff = max(float(np.abs(logits[block] - logits[blocks[0]]).max()) for block in blocks)
        if not diff <= 1e-4:
            raise SystemExit(f"padded logits differ from unpadded ones at {height}x{width}: max |diff| {diff:.2e}")
        best = min(medians.values())
        cells = " | ".join(f"{medians[block]:.1f}" for block in blocks)
        lines.append(f"| {height}x{width} | {cells} | {medians[blocks[0]] / best:.2f}x | {diff:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in SIZES])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--no-peers", action="store_true", help="skip the torchvision MobileNetV3 models")
    parser.add_argument(
        "--key-rows", action="store_true", help="only eager NCHW, the deployed Predictor and the mask paths (no peers)"
    )
    parser.add_argument("--profile", metavar="HxW", help="print the top ops at this size and exit")
    parser.add_argument(
        "--padding-ab", action="store_true", help="time the deployed session per channel block, interleaved, then exit"
    )
    parser.add_argument("--int8", action="store_true", help="with --padding-ab: time the default INT8 file instead")
    parser.add_argument(
        "--results-name",
        default="",
        help="results file name under benchmarks/results (default: inference_<ISA tag>; give another to keep a "
        "run on a different CPU with the same ISA apart)",
    )
    args = parser.parse_args(argv)
    print(describe_machine(), flush=True)
    print(isa_line(), flush=True)
    if args.profile:
        print(profile_top_ops(tuple(int(v) for v in args.profile.split("x"))))
        return 0
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    if args.padding_ab:
        kind = "INT8" if args.int8 else "fp32"
        here, cpu = configured_block(args.int8), padding_block(quantized=args.int8)
        print(f"the deployed {kind} session's channel block here: {here} (this CPU's: {cpu})")
        print(padding_ab(sizes, int8=args.int8))
        return 0
    rows, goals, extra = run(sizes, not args.no_compile, not args.no_peers and not args.key_rows, args.key_rows)
    per_library = ", ".join(f"{lib} {rate:.0f}" for lib, rate in sorted(extra["gemm"]["per library"].items()))
    print(
        f"fp32 GEMM ceiling in this run: {extra['gemm']['GFLOP/s (median)']:.0f} GFLOP/s "
        f"({extra['gemm']['threads']} threads, {extra['gemm']['library']}; per library: {per_library})"
    )
    print(markdown_table(rows, COLUMNS))
    print()
    print(markdown_table(goals, ["target", "value", "met"]))
    print(f"results: {write_results(args.results_name or f'inference_{isa_tag()}', rows, extra)}")
    if extra["parity_failures"]:
        raise SystemExit("parity check FAILED:\n" + "\n".join(extra["parity_failures"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
