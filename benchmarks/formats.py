"""What each deployment format costs in accuracy and gains in speed: PyTorch fp32, ONNX fp32, INT8, FP16.

Run: ``python -m benchmarks.formats --model-uri <model> --data <preprocess out_dir>``. Without ``--model-uri`` the
script trains FC-HarDNet on the built-in synthetic scenes first (``--train-steps``, configs/synthetic.yaml); without
``--data`` it preprocesses those scenes into a temporary folder.

Per format: mIoU on the evaluation split and its difference to PyTorch fp32 in points, argmax agreement with PyTorch
fp32 (all pixels), median ms of ``Predictor.predict_mask`` at 512x1024 and 1024x2048 (street scenes), and the size.
INT8 is also made with other choices of nodes kept in fp32 (none, first conv, last conv, both: the default, and also
every Resize and Concat), to show which nodes cost accuracy. FP16 is not timed on a CPU (ONNX Runtime's CPU provider
casts around most of its ops).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import torch

from benchmarks.common import describe_machine, markdown_table, write_results
from benchmarks.inference import isa_line, isa_tag
from segmentation.config_loading import CONFIG_DIR, load_config
from segmentation.data.preprocess import run_preprocess
from segmentation.evaluation.formats import CPU_ONLY_NOTE, TIMING_SIZES, file_size, format_row, reference_row
from segmentation.inference.onnx import export_onnx
from segmentation.inference.predictor import Predictor
from segmentation.inference.quantize import conv_names, convert_fp16, quantize_int8
from segmentation.mlops.model_store import load_model
from segmentation.steps.export import load_images
from segmentation.training.engine import fit

COLUMNS = ["format", "mIoU", "mIoU delta (points)", "argmax agreement"]
COLUMNS += [f"ms {h}x{w}" for h, w in TIMING_SIZES] + ["cpu share", "size MB", "note"]


def train_synthetic(data: Path, out: Path, steps: int) -> Path:
    """FC-HarDNet trained ``steps`` steps on the synthetic scenes (untracked); returns the best checkpoint."""
    overrides = [f"data.root={data}", f"train.output_dir={out}", f"train.max_steps={steps}"]
    overrides += [f"train.val_every_n_steps={steps}", "train.num_val_images_logged=0", "system.num_workers=0"]
    return fit(load_config(CONFIG_DIR / "synthetic.yaml", overrides), log_model=False).best_checkpoint


def int8_variants(fp32: Path) -> dict[str, list[str]]:
    """Nodes kept in fp32 per INT8 variant: none, the first conv, the last conv (class scores), both (default), and
    the resizes and concatenations (the decoder's skip joins)."""
    names = conv_names(fp32)
    joins = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Resize", "Concat")]
    return {
        "onnx-int8 (all quantized)": [],
        "onnx-int8 (first conv fp32)": names[:1],
        "onnx-int8 (last conv fp32)": names[-1:],
        "onnx-int8 (first + last fp32, default)": [names[0], names[-1]],
        "onnx-int8 (first + last + Resize/Concat fp32)": [names[0], names[-1], *joins],
    }


def run(model_uri: str, data: str, calibration_images: int, sizes, workdir: Path) -> list[dict]:
    model, classes = load_model(model_uri)
    calibration = [item.image for item in load_images(data, "split01", "train", classes, calibration_images)]
    evaluation = load_images(data, "split01", "val", classes)
    args = (evaluation, classes.num_classes, classes.ignore_index)
    reference, masks = reference_row(model, *args, timing_sizes=sizes)
    rows = [reference]
    print(f"  {reference['format']}: mIoU {reference['mIoU']:.4f}", flush=True)
    fp32 = workdir / "fp32.onnx"
    export_onnx(model, fp32)
    files = {"onnx": fp32}
    for name, exclude in int8_variants(fp32).items():
        files[name] = quantize_int8(fp32, calibration, workdir / f"int8-{len(files)}.onnx", exclude)
    files["onnx-fp16"] = convert_fp16(fp32, workdir / "fp16.onnx")
    for name, path in files.items():
        time_it = name != "onnx-fp16" or torch.cuda.is_available()
        predictor = Predictor.from_onnx(path)
        row = format_row(
            name, predictor, evaluation, masks, reference["mIoU"], *args[1:], file_size(path), sizes, time_it
        )
        rows.append(row)
        print(f"  {name}: mIoU delta {row['mIoU delta (points)']:+.2f} points {row['note']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="", help="a model package, checkpoint folder or MLflow model URI")
    parser.add_argument("--data", default="", help="preprocess out_dir with split01 (default: synthetic scenes)")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps when no --model-uri")
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--sizes", nargs="+", default=[f"{h}x{w}" for h, w in TIMING_SIZES])
    parser.add_argument(
        "--results-name", default="", help="results file name under benchmarks/results (default: formats_<ISA tag>)"
    )
    args = parser.parse_args(argv)
    print(describe_machine(), flush=True)
    print(isa_line(), flush=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            data = str(Path(tmp) / "data")
            run_preprocess("synthetic", "", data, num_images=100)
        model_uri = args.model_uri or str(train_synthetic(Path(data), Path(tmp) / "train", args.train_steps))
        rows = run(model_uri, data, args.calibration_images, sizes, Path(tmp))
    columns = COLUMNS[:4] + [f"ms {h}x{w}" for h, w in sizes] + COLUMNS[-3:]
    print(markdown_table(rows, columns))
    if any(row["note"] == CPU_ONLY_NOTE for row in rows):
        print(f"onnx-fp16: {CPU_ONLY_NOTE} (no GPU here); its accuracy is measured on the CPU provider.")
    extra = {"isa": isa_line(), "model_uri": args.model_uri or "trained"}
    print(f"results: {write_results(args.results_name or f'formats_{isa_tag()}', rows, extra)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
