"""Side-by-side benchmark of the MTP loss paths, shared by `mtp-ext bench` and bench/.

Paths: fused (mtp_ext), reference (plain PyTorch), compiled (the reference under torch.compile),
torch_chunked (PyTorch's own chunked F.linear_cross_entropy, one call per head) and the GEMM
floor (the matrix products the loss must do: X W^T, G W, G^T X per head; X W^T alone for a
forward; in fp32 where the CPU ops multiply 16-bit operands so, floor_operands). Times are medians of repeated runs in one process; peak memory is measured in a fresh
process per path (`python -m mtp_ext.benchmark probe ...`) as the rise of peak RSS (CPU) or
torch.cuda.max_memory_allocated (CUDA) over a warm step.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import mtp_ext
from mtp_ext import reference, switches
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


# The unembeddings of LLMs that `mtp-ext bench --preset llm` times: key: (name, D, V).
LLM_SHAPES = {"qwen2.5-0.5b": ("Qwen2.5 0.5B", 896, 151936),
              "llama3.2-1b": ("Llama 3.2 1B", 2048, 128256),
              "gemma2-2b": ("Gemma 2 2B", 2304, 256000),
              "llama3-8b": ("Llama 3 8B", 4096, 128256)}


def flops(case: Case) -> float:
    """The floor's floating-point operations: per head X W^T, and G W, G^T X with a backward."""
    return (3 if case.backward else 1) * 2.0 * case.n * case.N * case.V * case.D


def floor_operands(case: Case, *tensors):
    """The GEMM floor's operands: in the input dtype, or in fp32 where the CPU ops multiply 16-bit
    operands in fp32 (mtp_ext.switches.cpu_products_in_fp32: a CPU without the dtype's dot
    products, whose 16-bit GEMMs are emulated), converted outside the timing."""
    if case.device == "cpu" and switches.cpu_products_in_fp32(DTYPES[case.dtype]):
        return tuple(t.float() for t in tensors)
    return tensors


def floor_gradient(case: Case, h0: torch.Tensor) -> torch.Tensor:
    """The GEMM floors' stand-in for the logits' gradient: [N, V], random, in the input dtype."""
    return torch.randn(case.N, case.V).to(h0.device, h0.dtype)


def make_step(path: str, case: Case, inputs=None, G: Optional[torch.Tensor] = None
              ) -> Callable[[], None]:
    """A closure running one step of `path` on fresh leaves of the case's inputs (`inputs`:
    make_inputs(case), shared by several paths; G: the gemm_floor's gradient operand, shared
    with the best-layout floor)."""
    h0, w0, labels = inputs or make_inputs(case)
    if path == "gemm_floor":
        X = h0.reshape(case.n, case.N, case.D)
        G = floor_gradient(case, h0) if G is None else G
        X, w0, G = floor_operands(case, X, w0, G)

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


def time_once(step: Callable[[], None], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def time_step(step: Callable[[], None], device: str, repeats: int) -> List[float]:
    step()  # warm up (compiles, allocates)
    return [time_once(step, device) for _ in range(repeats)]


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


    vs_best: Optional[float] = None  # time / best-layout floor
    tflops: Optional[float] = None    # the floor's operations per second of this path


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def memory_need(path: str, case: Case) -> int:
    """A rough upper bound of a path's memory beyond its inputs (bytes): eager PyTorch holds the
    [n, N, V] logits in the input dtype and fp32 with their gradient; torch.compile about 1.5x
    the logits in the input dtype (4.5 GiB measured at n = 4, N = 4096, V = 128256, bf16)."""
    elt = DTYPES[case.dtype].itemsize
    logits = case.n * case.N * case.V
    return {"reference": logits * (2 * elt + 8), "compiled": int(logits * elt * 1.5)}.get(path, 0)


def fits(path: str, case: Case) -> bool:
    """Whether the path's memory_need fits in 70% of the memory available now (CPU)."""
    avail = _available_bytes()
    return case.device != "cpu" or avail is None or memory_need(path, case) <= 0.7 * avail


PRODUCT_LAYOUTS = {
    # product: {layout: (operands made once, outside the timing) -> the product}
    "logits X W^T": {
        "X @ W^T": lambda X, W, G: lambda: torch.mm(X, W.t()),
        "W @ X^T, X^T contiguous": lambda X, W, G: (lambda Xt: lambda: torch.mm(W, Xt))(
            X.t().contiguous()),
        "X @ W^T, W^T contiguous": lambda X, W, G: (lambda Wt: lambda: torch.mm(X, Wt))(
            W.t().contiguous())},
    "dX = G W": {
        "G @ W": lambda X, W, G: lambda: torch.mm(G, W),
        "W^T @ G^T, both contiguous": lambda X, W, G: (lambda Wt, Gt: lambda: torch.mm(Wt, Gt))(
            W.t().contiguous(), G.t().contiguous()),
        "W^T @ G^T, G^T contiguous": lambda X, W, G: (lambda Gt: lambda: torch.mm(W.t(), Gt))(
            G.t().contiguous())},
    "dW = G^T X": {
        "G^T @ X": lambda X, W, G: lambda: torch.mm(G.t(), X),
        "G^T @ X, G^T contiguous": lambda X, W, G: (lambda Gt: lambda: torch.mm(Gt, X))(
            G.t().contiguous()),
        "X^T @ G, transposed out": lambda X, W, G: (lambda Xt: lambda: torch.mm(Xt, G))(
            X.t().contiguous())},
}


class LayoutFloor:
    """The best-layout floor, timed in the rounds of `compare` beside the paths: each call of
    time_round runs every product once in each operand layout (PRODUCT_LAYOUTS; the contiguous
    copies made before the timing and freed after it, so one copy lives at a time). result():
    per layout the median over rounds, the fastest layout of each product, one head's products
    times n. G: the floor's gradient operand [N, V] (shared with the gemm_floor path)."""

    def __init__(self, case: Case, inputs=None, G: Optional[torch.Tensor] = None):
        h0, w0, _ = inputs or make_inputs(case)
        X = h0.reshape(case.n, case.N, case.D)[0]
        W = w0[0] if case.per_head else w0
        G = floor_gradient(case, h0) if G is None else G
        self.case = case
        self.X, self.W, self.G = floor_operands(case, X, W, G)
        self.products = [p for p in PRODUCT_LAYOUTS if case.backward or p == "logits X W^T"]
        self.times: Dict[tuple, List[float]] = {}

    def warm_up(self) -> None:
        """One untimed round: each layout's first run (allocations, BLAS's own set-up)."""
        self.time_round()
        self.times.clear()

    def time_round(self, log=None) -> float:
        """One run of every layout of every product; returns this round's best-layout sum."""
        best = {}
        for product in self.products:
            for name, make in PRODUCT_LAYOUTS[product].items():
                fn = make(self.X, self.W, self.G)
                t = time_once(fn, self.case.device)
                del fn
                self.times.setdefault((product, name), []).append(t)
                if log:
                    log(f"    {product}: {name} {t:.3f} s")
                best[product] = min(best.get(product, t), t)
        return self.case.n * sum(best.values())

    def result(self):
        """(seconds, {product: (fastest layout, median seconds per head)})."""
        best = {}
        for (product, name), ts in self.times.items():
            t = statistics.median(ts)
            if product not in best or t < best[product][1]:
                best[product] = (name, t)
        return self.case.n * sum(t for _, t in best.values()), best


def best_layout_floor(case: Case, repeats: int = 3, inputs=None, log=print):
    """The best-layout floor alone (LayoutFloor for `repeats` rounds, after one warm-up run of
    each layout). Returns (seconds, {product: (fastest layout, seconds per head)})."""
    floor = LayoutFloor(case, inputs)
    floor.warm_up()
    for _ in range(repeats):
        floor.time_round(log)
    return floor.result()


def settle_layouts(step: Callable[[], None], log=print, most: int = 6) -> None:
    """More warm-up steps of the fused CPU path while it still tries both logits layouts on a
    chunk shape (cpu_layout auto: the first chunks of each shape are timed in both), so that the
    timed steps run in the layout it keeps; logs what it kept."""
    def trying():
        return [t for t in switches.cpu_layout_trials() if t["choice"] is None]
    for _ in range(most):
        if not trying():
            break
        step()
    for t in switches.cpu_layout_trials():
        log(f"    layout {t['dtype']} chunk {t['chunk_rows']} D {t['D']} V {t['V']}: "
            f"{t['choice'] or 'still trying'} (us/row: row {t['row_us']:.1f}, "
            f"vocab {t['vocab_us']:.1f}; {t['chunks']} chunks)")


def compare(case: Case, paths=PATHS, repeats: int = 3, memory: bool = True, best_floor=False,
            log=print) -> List[Row]:
    """Every path's median time over `repeats` rounds, the paths interleaved within each round
    (after one warm-up step each) on the same inputs; a path whose memory_need does not fit is
    left out, and one that fails is reported; each against the GEMM floor as written (and, with
    best_floor, the best-layout floor, its layouts timed in the same rounds: LayoutFloor), and
    peak memory per path in a fresh process."""
    inputs = make_inputs(case)
    G = floor_gradient(case, inputs[0]) if best_floor or "gemm_floor" in paths else None
    steps, times = {}, {}
    for p in paths:
        if not fits(p, case):
            log(f"  {p} left out: needs ~{memory_need(p, case) / 2**30:.1f} GiB, "
                f"{(_available_bytes() or 0) / 2**30:.1f} GiB available")
            continue
        log(f"  warming {p} ...")
        try:
            steps[p] = make_step(p, case, inputs, G=G)
            steps[p]()  # compiles, allocates
            if p == "fused" and case.device == "cpu":
                settle_layouts(steps[p], log)
        except Exception as e:  # a path that cannot run this case is reported, not fatal
            log(f"  {p} failed: {type(e).__name__}: {e}")
            steps.pop(p, None)
    layouts = None
    if best_floor:  # timed in the same rounds as the paths: the machine's drift hits both
        log("  warming the best-layout floor ...")
        layouts = LayoutFloor(case, inputs, G)
        layouts.warm_up()
    for r in range(repeats):
        for p, step in steps.items():
            times.setdefault(p, []).append(time_once(step, case.device))
        line = "  ".join(f"{p} {t[-1]:.3f}" for p, t in times.items())
        if layouts:
            line += f"  best-layout floor {layouts.time_round(log):.3f}"
        log(f"  round {r + 1}: " + line)
    steps.clear()
    best = None
    if layouts:
        best, chosen = layouts.result()
        for product, (name, t) in chosen.items():
            log(f"    best layout of {product}: {name} ({t:.3f} s per head, median)")
        del layouts
    del G
    del inputs
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
                        ref / med[p] if ref else None, mib,
                        med[p] / best if best else None, flops(case) / med[p] / 1e12))
    if best:
        rows.append(Row("best_layout_floor", best, best / floor if floor else float("nan"),
                        ref / best if ref else None, None, 1.0, flops(case) / best / 1e12))
    return rows


def _ratio(x: Optional[float]) -> str:
    """A ratio cell: blank where there is nothing to divide by (no gemm_floor path timed)."""
    return "" if x is None or math.isnan(x) else f"{x:.3f}"


def format_table(case: Case, rows: List[Row]) -> str:
    out = [f"{case.label()}",
           "| path | time (s) | time / GEMM floor | speedup vs reference | peak memory (MiB) "
           "| memory saving vs reference | time / best-layout floor | TFLOP/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref_mib = next((r.peak_mib for r in rows if r.path == "reference"), None)
    for r in rows:
        sp = "" if r.vs_reference is None else f"{r.vs_reference:.2f}x"
        mem = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        save = f"{ref_mib / r.peak_mib:.1f}x" if ref_mib and r.peak_mib else ""
        best = "" if r.vs_best is None else f"{r.vs_best:.3f}"
        rate = "" if r.tflops is None else f"{r.tflops:.2f}"
        out.append(f"| {r.path} | {r.seconds:.3f} | {_ratio(r.vs_floor)} | {sp} | {mem} | {save} "
                   f"| {best} | {rate} |")
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
        others = [r for r in rows if r.path not in ("fused", "gemm_floor", "best_layout_floor")]
        if fused is None or not others:
            continue
        fast = min(others, key=lambda r: r.seconds)
        mems = [r for r in others if r.peak_mib is not None]
        lean = min(mems, key=lambda r: r.peak_mib) if mems else None
        fmem = "" if fused.peak_mib is None else f"{fused.peak_mib:.0f}"
        lmem = "" if lean is None else f"{lean.peak_mib:.0f} ({lean.path})"
        out.append(f"| {case.label().replace(' shared', '')} | {_ratio(fused.vs_floor)} | "
                   f"{fast.path} {_ratio(fast.vs_floor)} | {fused.seconds / fast.seconds:.3f} | "
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
            more = [num(c) for c in cells[6:8]] if len(cells) >= 8 else []
            rows.append(Row(cells[0], float(cells[1]), float(cells[2] or "nan"), num(cells[3]),
                            num(cells[4]), *more))
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
