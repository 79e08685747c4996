"""Machine ceilings: fp32 GEMM GFLOP/s (1 thread and all threads) and memory copy bandwidth.

Run: ``python -m benchmarks.ceilings``. The other benchmarks compare their achieved GFLOP/s with these numbers.
"""

from __future__ import annotations

import torch

from benchmarks.common import describe_machine, markdown_table, time_fn, write_results


def gemm_gflops(threads: int, n: int = 2048) -> dict:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    timing = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, repeats=7)
    flops = 2 * n**3
    return {
        "what": f"fp32 GEMM {n}x{n}",
        "threads": threads,
        **timing,
        "GFLOP/s (median)": flops / timing["median_ms"] / 1e6,
        "GFLOP/s (best)": flops / timing["min_ms"] / 1e6,
    }


def copy_bandwidth(threads: int, mib: int = 256) -> list[dict]:
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4 * 2  # read + write
    preallocated = time_fn(lambda: dst.copy_(src), warmup=2, repeats=7)
    fresh = time_fn(lambda: src.clone(), warmup=2, repeats=7)
    return [
        {
            "what": f"copy {mib} MiB into preallocated memory",
            "threads": threads,
            **preallocated,
            "GB/s (median)": nbytes / preallocated["median_ms"] / 1e6,
        },
        {
            "what": f"clone {mib} MiB into fresh memory",
            "threads": threads,
            **fresh,
            "GB/s (median)": nbytes / fresh["median_ms"] / 1e6,
        },
    ]


def run() -> list[dict]:
    all_threads = torch.get_num_threads()
    rows = [gemm_gflops(1), gemm_gflops(all_threads)]
    rows += copy_bandwidth(all_threads)
    torch.set_num_threads(all_threads)
    return rows


def main() -> None:
    rows = run()
    print(describe_machine())
    print(
        markdown_table(
            rows,
            [
                "what",
                "threads",
                "median_ms",
                "min_ms",
                "max_ms",
                "cpu_share",
                "GFLOP/s (median)",
                "GFLOP/s (best)",
                "GB/s (median)",
            ],
        )
    )
    print(f"results: {write_results('ceilings', rows)}")


if __name__ == "__main__":
    main()
