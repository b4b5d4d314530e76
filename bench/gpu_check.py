"""One script for a GPU machine (under 5 minutes on an H200): builds the CUDA extension, runs the
CUDA tests, and prints time and peak memory of the fused path, the reference path and
torch.compile (and Liger-Kernel / cut-cross-entropy when importable) at design.md's GPU
reference shape, n = 4, N = 16384, D = 4096, V = 128256, bf16, with the GEMM floor.

    python bench/gpu_check.py [--skip-build] [--out gpu_results.md]
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def optional_paths(case):
    """Liger-Kernel and cut-cross-entropy, one call per head, when importable."""
    import torch
    from mtp_ext import benchmark as B
    from mtp_ext._checks import shift_labels
    extra = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
        extra["liger"] = lambda h, w, y: liger(h, w, y)
    except ImportError:
        print("liger-kernel not importable: skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        extra["cut_cross_entropy"] = lambda h, w, y: cce(h, w, y)
    except ImportError:
        print("cut-cross-entropy not importable: skipped")
    rows = []
    for name, fn in extra.items():
        h0, w0, labels = B.make_inputs(case)
        targets = shift_labels(labels, case.n, -100).reshape(case.n, -1)

        def step():
            h = h0.detach().reshape(case.n, -1, case.D).requires_grad_()
            w = w0.detach().requires_grad_()
            sum(fn(h[k], w, targets[k]) for k in range(case.n)).backward()
        torch.cuda.reset_peak_memory_stats()
        times = B.time_step(step, "cuda", 3)
        rows.append((name, sorted(times)[1], torch.cuda.max_memory_allocated() / 2**20))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not a.skip_build:
        env = dict(os.environ, FORCE_CUDA="1")
        if run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", "."],
               env=env):
            return 1
    rc = run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_cuda.py",
              "tests/test_correctness.py", "-k", "cuda or float32"])
    import torch
    from mtp_ext import benchmark as B
    case = B.Case(n=4, N=16384, D=4096, V=128256, dtype="bf16", device="cuda")
    rows = B.compare(case, paths=("fused", "reference", "compiled", "gemm_floor"), repeats=5,
                     log=lambda s: print(s, flush=True))
    table = B.format_table(case, rows)
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", table]
    for name, t, mib in optional_paths(case):
        lines.append(f"| {name} | {t:.3f} | | | {mib:.0f} (incl. inputs) |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
