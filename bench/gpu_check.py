"""One script for a GPU machine (a lent GPU has 15 minutes in all): builds the CUDA extension,
runs every CUDA test without stopping at the first failure and lists all failures, then prints
time and peak memory of the fused path, the reference path, torch.compile and the GEMM floor
(and Liger-Kernel / cut-cross-entropy when importable) at the GPU reference shape of
docs/design.md, n = 4, N = 16384, D = 4096, V = 128256, bf16, and runs `mtp-ext train --device
cuda`, a one-rank torchrun of it (nccl) and `mtp-ext generate --device cuda`, each reported.
Each part says how long it took.

    python bench/gpu_check.py [--skip-build] [--out gpu_results.md]

Without a CUDA device it is a dry run: it collects and runs the same tests (each CUDA case then
reports itself skipped) and times a small CPU case instead, so that the script is checked end to
end on any machine.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TESTS = ["-k", "cuda"]  # tests/test_cuda.py and the cuda case of every device-parametrized test


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


class Timer:
    def __init__(self):
        self.parts = []

    def part(self, name, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.parts.append((name, time.perf_counter() - t0))
            print(f"--- {name}: {self.parts[-1][1]:.0f} s", flush=True)


def training_checks(device):
    """`mtp-ext train --device D` (a short run), the same under a one-rank torchrun (nccl on
    CUDA) and `mtp-ext generate --device D --speculative` from its checkpoint: each command's
    exit code and its last lines."""
    import tempfile
    out = tempfile.mkdtemp(prefix="gpu_check_")
    small = ["--steps", "20", "--batch-size", "8", "--seq-len", "128", "--eval-every", "1000",
             "--eval-batches", "2", "--device", device]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "1"]
    cmds = {
        "train": [sys.executable, "-m", "mtp_ext", "train", "--out", f"{out}/one", *small],
        "torchrun (1 rank)": torchrun + ["-m", "mtp_ext", "train", "--out", f"{out}/ddp", *small],
        "generate": [sys.executable, "-m", "mtp_ext", "generate", "--checkpoint",
                     f"{out}/one/checkpoint.pt", "--prompt", "def ", "--max-new-tokens", "32",
                     "--speculative", "--device", device],
    }
    lines = []
    for name, cmd in cmds.items():
        print("+", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        tail = [l for l in (r.stdout + r.stderr).strip().splitlines()
                if l.strip() and not l.startswith(("[#", "[-"))][-3:]  # no progress bars
        print("\n".join(tail), flush=True)
        lines.append(f"{name} --device {device}: exit {r.returncode}; " + " / ".join(tail))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    if not gpu:
        print("no CUDA device: dry run (CUDA tests collected and skipped, a small CPU timing)")
    timer = Timer()
    if not a.skip_build:
        env = dict(os.environ, FORCE_CUDA="1" if gpu else "0")
        rc = timer.part("build", lambda: run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", "."],
            env=env))
        if rc:
            return rc
    # every CUDA test, all failures listed (-rfE), none stopping the others
    tests_rc = timer.part("tests", lambda: run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *CUDA_TESTS]))
    checks = timer.part("training and decoding", lambda: training_checks("cuda" if gpu else "cpu"))
    from mtp_ext import benchmark as B
    if gpu:
        case = B.Case(n=4, N=16384, D=4096, V=128256, dtype="bf16", device="cuda")
    else:
        case = B.Case(n=2, N=512, D=128, V=4096, dtype="bf16", device="cpu")
    rows = timer.part("timing", lambda: B.compare(
        case, paths=("fused", "reference", "compiled", "gemm_floor"), repeats=5 if gpu else 1,
        memory=gpu, log=lambda s: print(s, flush=True)))
    device = torch.cuda.get_device_name() if gpu else "CPU (dry run)"
    lines = [f"{device}, torch {torch.__version__}", B.format_table(case, rows)]
    if gpu:
        for name, t, mib in timer.part("other libraries", lambda: optional_paths(case)):
            lines.append(f"| {name} | {t:.3f} | | | {mib:.0f} (incl. inputs) |")
    lines.extend(checks)
    lines.append("tests: " + ("passed" if tests_rc == 0 else f"FAILED (pytest exit code {tests_rc})"))
    lines.append("time: " + ", ".join(f"{name} {s:.0f} s" for name, s in timer.parts))
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return tests_rc


if __name__ == "__main__":
    sys.exit(main())
