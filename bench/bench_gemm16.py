"""The fused loss with 16-bit inputs, its products native (ATen's 16-bit GEMMs) against in fp32
(the cpu_gemm16 switch), beside plain PyTorch eager and torch.compile in the same dtype: the
paths interleaved round by round in one process, medians. On a CPU without the dtype's dot
products the native products are emulated (docs/design.md, "Precision").

    python bench/bench_gemm16.py [--n 1] [--rows 512] [--hidden 512] [--vocab 8192] [--dtype bf16]
"""
import argparse
import statistics

import torch

from mtp_ext import benchmark as B
from mtp_ext import switches


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    case = B.Case(n=a.n, N=a.rows, D=a.hidden, V=a.vocab, dtype=a.dtype)
    print(case.label(), "| auto multiplies in fp32:",
          switches.cpu_products_in_fp32(B.DTYPES[a.dtype]))
    inputs = B.make_inputs(case)
    steps = {p: B.make_step(p, case, inputs) for p in ("fused", "reference", "compiled")}
    runs = [("fused", "fp32"), ("fused", "native"), ("reference", "auto"), ("compiled", "auto")]
    times = {}
    for r in range(a.repeats + 1):  # round 0 warms up (compiles)
        for path, gemm16 in runs:
            with switches.forced(cpu_gemm16=gemm16):
                t = B.time_once(steps[path], "cpu")
            if r:
                times.setdefault(f"{path} (cpu_gemm16={gemm16})", []).append(t)
    print("| path | median s | GFLOP/s |\n|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {B.flops(case) / m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
