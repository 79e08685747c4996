"""Machine ceilings: fp32 GEMM GFLOP/s (1 thread and all threads) and memory copy bandwidth.

Run: ``python -m benchmarks.ceilings``. The other benchmarks compare their achieved GFLOP/s with these numbers.
GEMM is measured in both libraries the project runs: torch's BLAS (MKL in the PyPI wheels) and ONNX Runtime's MLAS.
They differ by CPU: on an AMD Zen 5 VM MKL ran AVX2 code at half the rate of MLAS's AVX-512 kernels, so the ceiling
is the faster of the two.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import describe_machine, markdown_table, time_fn, write_results

GEMM_LIBRARIES = ("torch", "onnxruntime")


def gemm_gflops(threads: int, n: int = 2048, library: str = "torch") -> dict:
    """fp32 ``n`` x ``n`` matrix product GFLOP/s on ``threads`` threads with torch (``torch.mm``) or ONNX Runtime
    (a one-node MatMul graph on the CPU provider)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    if library == "torch":
        out = torch.empty(n, n)
        timing = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, repeats=7)
    elif library == "onnxruntime":
        session = _matmul_session(n, threads)
        feeds = {"a": a.numpy(), "b": b.numpy()}
        timing = time_fn(lambda: session.run(None, feeds), warmup=2, repeats=7)
    else:
        raise ValueError(f"GEMM library {library!r}: use one of {', '.join(GEMM_LIBRARIES)}")
    flops = 2 * n**3
    return {
        "what": f"fp32 GEMM {n}x{n}",
        "library": library,
        "threads": threads,
        **timing,
        "GFLOP/s (median)": flops / timing["median_ms"] / 1e6,
        "GFLOP/s (best)": flops / timing["min_ms"] / 1e6,
    }


def _matmul_session(n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


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
    rows = [gemm_gflops(threads, library=lib) for lib in GEMM_LIBRARIES for threads in (1, all_threads)]
    rows += copy_bandwidth(all_threads)
    torch.set_num_threads(all_threads)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results-name", default="ceilings", help="results file name under benchmarks/results (default: ceilings)"
    )
    args = parser.parse_args(argv)
    rows = run()
    print(describe_machine())
    print(
        markdown_table(
            rows,
            [
                "what",
                "library",
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
    print(f"results: {write_results(args.results_name, rows)}")


if __name__ == "__main__":
    main()
