"""Data-loader throughput: 1024x2048 synthetic street scenes -> 1024x1024 training crops, per worker count.

    python -m benchmarks.data_loading [--images 8] [--samples 24] [--workers 0 1 2]

Measures the full training input path (PNG decode with OpenCV, flip, random scale 0.5-2.0, pad, crop,
normalisation, collation) in samples/s after one warm-up batch, prints a markdown table and writes
``benchmarks/results/data_loading.json``. The images are generated once into a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import describe_machine, markdown_table, peak_rss_mib, write_results
from segmentation.config_loading import load_config
from segmentation.data.datasets import build_dataloader
from segmentation.data.preprocess import run_preprocess


def measure(root: Path, num_workers: int, num_samples: int, batch_size: int) -> dict:
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "augmentation.crop_height=1024",
            "augmentation.crop_width=1024",
            f"system.num_workers={num_workers}",
            "system.cpu=true",
        ],
    )
    loader = build_dataloader(cfg, "train", train=True, batch_size=batch_size, shuffle=True)
    seen, start, epochs = 0, None, 0
    while seen < num_samples:
        for images, _ in loader:
            if start is None:  # the first batch pays for worker start-up; leave it out
                start = time.perf_counter()
                continue
            seen += images.shape[0]
            if seen >= num_samples:
                break
        epochs += 1
    elapsed = time.perf_counter() - start
    return {
        "workers": num_workers,
        "batch_size": batch_size,
        "samples": seen,
        "seconds": elapsed,
        "samples_per_s": seen / elapsed,
        "ms_per_sample": 1000 * elapsed / seen,
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="distinct 1024x2048 images generated")
    parser.add_argument("--samples", type=int, default=24, help="samples timed per worker count")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        run_preprocess("synthetic", "", tmp, num_images=args.images, height=1024, width=2048, val_fraction=0.0)
        rows = [measure(Path(tmp), w, args.samples, args.batch_size) for w in args.workers]
    print(describe_machine())
    print(markdown_table(rows, ["workers", "batch_size", "samples", "samples_per_s", "ms_per_sample", "peak_rss_mib"]))
    print(f"results: {write_results('data_loading', rows, {'input': '1024x2048 PNG', 'crop': '1024x1024'})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
