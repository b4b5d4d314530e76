"""Side-by-side benchmark of the MTP loss paths, shared by `mtp-ext bench` and bench/.

Paths: fused (mtp_ext), reference (plain PyTorch), compiled (the reference under torch.compile),
torch_chunked (PyTorch's own chunked F.linear_cross_entropy, one call per head) and the GEMM
floor (the matrix products the loss must do: X W^T, G W, G^T X per head; X W^T alone for a
forward). Times are medians of repeated runs in one process; peak memory is measured in a fresh
process per path (`python -m mtp_ext.benchmark probe ...`) as the rise of peak RSS (CPU) or
torch.cuda.max_memory_allocated (CUDA) over a warm step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import mtp_ext
from mtp_ext import reference
from mtp_ext._checks import shift_labels

PATHS = ("fused", "reference", "compiled", "torch_chunked", "gemm_floor")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    n: int = 4
    N: int = 4096           # rows per head
    D: int = 1024
    V: int = 32768
    dtype: str = "fp32"
    per_head: bool = False  # one unembedding per head
    backward: bool = True   # forward+backward, or forward only
    device: str = "cpu"

    def label(self) -> str:
        w = "per-head" if self.per_head else "shared"
        mode = "fwd+bwd" if self.backward else "fwd"
        return f"n={self.n} N={self.N} D={self.D} V={self.V} {self.dtype} {w} {mode}"


def make_inputs(case: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    h = torch.randn(case.n, 1, case.N, case.D, generator=g).to(case.device, dt)
    wshape = (case.n, case.V, case.D) if case.per_head else (case.V, case.D)
    w = (torch.randn(*wshape, generator=g) * case.D ** -0.5).to(case.device, dt)
    labels = torch.randint(0, case.V, (1, case.N), generator=g).to(case.device)
    return h, w, labels


def make_step(path: str, case: Case) -> Callable[[], None]:
    """A closure running one step of `path` on fresh leaves of the case's inputs."""
    h0, w0, labels = make_inputs(case)
    if path == "gemm_floor":
        X = h0.reshape(case.n, case.N, case.D)
        G = torch.randn(case.N, case.V).to(h0.device, h0.dtype)

        def floor():
            for k in range(case.n):
                W = w0[k] if case.per_head else w0
                torch.mm(X[k], W.t())
                if case.backward:
                    torch.mm(G, W)
                    torch.mm(G.t(), X[k])
        return floor

    if path == "fused":
        loss_fn = lambda h, w: mtp_ext.mtp_loss(h, w, labels).loss
    elif path == "reference":
        loss_fn = lambda h, w: reference.mtp_loss(h, w, labels).loss
    elif path == "compiled":
        compiled = torch.compile(lambda h, w: reference.mtp_loss(h, w, labels).loss, dynamic=False)
        loss_fn = compiled
    elif path == "torch_chunked":
        targets = shift_labels(labels, case.n, -100).reshape(case.n, -1)
        opts = torch.nn.LinearCrossEntropyOptions()

        def loss_fn(h, w):
            hs = h.reshape(case.n, -1, case.D)
            return sum(F.linear_cross_entropy(hs[k], w[k] if case.per_head else w, targets[k],
                                              options=opts) for k in range(case.n))
    else:
        raise ValueError(f"unknown path {path!r}; choose from {PATHS}")

    def step():
        h = h0.detach().requires_grad_(case.backward)
        w = w0.detach().requires_grad_(case.backward)
        if case.backward:
            loss_fn(h, w).backward()
        else:
            with torch.no_grad():
                loss_fn(h, w)
    return step


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(step: Callable[[], None], device: str, repeats: int) -> List[float]:
    step()  # warm up (compiles, allocates)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ---- peak memory, in a fresh process ----

def _rss_now_and_peak():
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def _release_free_memory():
    """Hands the allocator's free pages back to the system (glibc), so that a step reusing
    them shows up in the resident set instead of hiding in it."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def probe_peak(path: str, case: Case) -> int:
    """Peak memory of one warm step above what was resident before it (bytes)."""
    step = make_step(path, case)
    step()  # warm: compile, libraries, allocator
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import gc
    gc.collect()
    _release_free_memory()
    _reset_peak_rss()
    base, _ = _rss_now_and_peak()
    step()
    return _rss_now_and_peak()[1] - base


def peak_memory(path: str, case: Case) -> Optional[int]:
    """probe_peak in a fresh process; None when it failed (the error goes to stderr)."""
    cmd = [sys.executable, "-m", "mtp_ext.benchmark", "probe", path, json.dumps(asdict(case))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(f"memory probe {path} {case.label()} failed:\n{r.stderr[-2000:]}\n")
        return None
    return int(r.stdout.strip().splitlines()[-1])


# ---- the comparison table ----

@dataclass
class Row:
    path: str
    seconds: float
    vs_floor: float
    vs_reference: Optional[float]
    peak_mib: Optional[float]


def compare(case: Case, paths=PATHS, repeats: int = 3, memory: bool = True,
            log=print) -> List[Row]:
    times: Dict[str, List[float]] = {}
    order = ["gemm_floor"] + [p for p in paths if p != "gemm_floor"] + ["gemm_floor"]
    for p in order:  # the floor before and after the others, side by side in one run
        log(f"  timing {p} ...")
        try:
            times.setdefault(p, []).extend(time_step(make_step(p, case), case.device, repeats))
        except Exception as e:  # a path that cannot run this case is reported, not fatal
            log(f"  {p} failed: {type(e).__name__}: {e}")
    med = {p: statistics.median(t) for p, t in times.items()}
    floor, ref = med.get("gemm_floor"), med.get("reference")
    rows = []
    for p in paths:
        if p not in med:
            continue
        mib = None
        if memory and p != "gemm_floor":
            log(f"  memory {p} ...")
            b = peak_memory(p, case)
            mib = None if b is None else b / 2**20
        rows.append(Row(p, med[p], med[p] / floor if floor else float("nan"),
                        ref / med[p] if ref else None, mib))
    return rows


def format_table(case: Case, rows: List[Row]) -> str:
    out = [f"{case.label()}",
           "| path | time (s) | time / GEMM floor | speedup vs reference | peak memory (MiB) "
           "| memory saving vs reference |",
           "|---|---:|---:|---:|---:|---:|"]
    ref_mib = next((r.peak_mib for r in rows if r.path == "reference"), None)
    for r in rows:
        sp = "" if r.vs_reference is None else f"{r.vs_reference:.2f}x"
        mem = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        save = f"{ref_mib / r.peak_mib:.1f}x" if ref_mib and r.peak_mib else ""
        out.append(f"| {r.path} | {r.seconds:.3f} | {r.vs_floor:.3f} | {sp} | {mem} | {save} |")
    return "\n".join(out)


def format_summary(results) -> str:
    """One line per case: the fused path against the fastest and the leanest other path (the
    GEMM floor is not a path a user can take)."""
    out = ["Summary: fused against the fastest and the least-memory other path of each case",
           "| case | fused / floor | fastest other | fused / fastest other | fused peak (MiB) "
           "| least other peak (MiB) |",
           "|---|---:|---|---:|---:|---:|"]
    for case, rows in results:
        fused = next((r for r in rows if r.path == "fused"), None)
        others = [r for r in rows if r.path not in ("fused", "gemm_floor")]
        if fused is None or not others:
            continue
        fast = min(others, key=lambda r: r.seconds)
        mems = [r for r in others if r.peak_mib is not None]
        lean = min(mems, key=lambda r: r.peak_mib) if mems else None
        fmem = "" if fused.peak_mib is None else f"{fused.peak_mib:.0f}"
        lmem = "" if lean is None else f"{lean.peak_mib:.0f} ({lean.path})"
        out.append(f"| {case.label().replace(' shared', '')} | {fused.vs_floor:.3f} | "
                   f"{fast.path} {fast.vs_floor:.3f} | {fused.seconds / fast.seconds:.3f} | "
                   f"{fmem} | {lmem} |")
    return "\n".join(out) + "\n"


def parse_tables(text: str):
    """The (Case, [Row]) results in markdown written by format_table (`mtp-ext bench --out`),
    so that plots can be redrawn from saved tables (`mtp-ext bench --replot FILE.md ...`)."""
    results, case, rows = [], None, []
    for line in text.splitlines():
        words = line.split()
        if line.startswith("n=") and not line.endswith(":"):
            kv = dict(w.split("=") for w in words[:4])
            case = Case(n=int(kv["n"]), N=int(kv["N"]), D=int(kv["D"]), V=int(kv["V"]),
                        dtype=words[4], per_head=words[5] == "per-head",
                        backward=words[6] == "fwd+bwd")
            rows = []
            results.append((case, rows))
        elif case is not None and line.startswith("| ") and words[1] in PATHS:
            cells = [c.strip() for c in line.strip("|").split("|")]
            num = lambda c: float(c.rstrip("x")) if c else None
            rows.append(Row(cells[0], float(cells[1]), float(cells[2]), num(cells[3]),
                            num(cells[4])))
    return results


def plot(results, filename: str):
    """PNG of time and peak memory of each path against each quantity that varies in results
    (a list of (Case, [Row])): heads n, vocabulary V, rows per head N, hidden size D. Needs
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (or 'mtp_ext[plot]')") from e
    axes_of = {"n": "heads n", "V": "vocabulary V", "N": "rows per head N", "D": "hidden size D"}
    varying = [a for a in axes_of if len({getattr(c, a) for c, _ in results}) > 1]
    if not varying:
        raise ValueError("nothing to plot: give several --heads, --vocab or --rows")
    fig, grid = plt.subplots(2, len(varying), figsize=(5.5 * len(varying), 8), squeeze=False)
    styles = {"fp32": "-", "bf16": "--", "fp16": ":"}
    colors = dict(zip(PATHS, ("C0", "C3", "C2", "C1", "C7")))
    for col, axis in enumerate(varying):
        t_ax, m_ax = grid[0][col], grid[1][col]
        others = [a for a in axes_of if a != axis]
        # one series per (dtype, path), the other quantities fixed at the setting with the
        # most points (ties: the largest)
        groups: Dict[tuple, list] = {}
        for c, rows in results:
            groups.setdefault(tuple(getattr(c, a) for a in others), []).append((c, rows))
        key = max(groups, key=lambda k: (len({getattr(c, axis) for c, _ in groups[k]}), k))
        fixed = ", ".join(f"{a}={v}" for a, v in zip(others, key))
        for dtype in dict.fromkeys(c.dtype for c, _ in groups[key]):
            items = sorted((it for it in groups[key] if it[0].dtype == dtype),
                           key=lambda it: getattr(it[0], axis))
            for path in PATHS:
                pts = [(getattr(c, axis), r.seconds, r.peak_mib) for c, rows in items
                       for r in rows if r.path == path]
                if not pts:
                    continue
                style = dict(linestyle=styles.get(dtype, "-"), marker="o", color=colors[path],
                             label=f"{path} {dtype}")
                t_ax.plot([x for x, _, _ in pts], [t for _, t, _ in pts], **style)
                mem = [(x, m) for x, _, m in pts if m is not None and m > 0]
                if mem:
                    m_ax.plot(*zip(*mem), **style)
        for ax, what in ((t_ax, "time per step (s)"), (m_ax, "peak memory above inputs (MiB)")):
            ax.set_xlabel(f"{axes_of[axis]}  ({fixed})")
            ax.set_ylabel(what)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    c0 = results[0][0]
    hidden = "" if "D" in varying else f"D={c0.D}, "
    fig.suptitle(f"MTP loss paths, {hidden}{'fwd+bwd' if c0.backward else 'fwd'}, "
                 f"{c0.device}: time and peak memory")
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mtp_ext.benchmark")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="peak memory of one path (internal)")
    pr.add_argument("path")
    pr.add_argument("case")
    a = ap.parse_args(argv)
    if a.cmd == "probe":
        print(probe_peak(a.path, Case(**json.loads(a.case))))


if __name__ == "__main__":
    main()
