"""mtp-ext command line: `mtp-ext bench` compares the loss paths side by side."""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


def bench(args) -> int:
    from . import benchmark as B
    heads = args.heads
    out = [f"# mtp-ext bench, {datetime.date.today().isoformat()}",
           f"machine: {_machine()}", f"command: mtp-ext {' '.join(args.argv)}", ""]
    print("\n".join(out), flush=True)
    for dtype in args.dtype:
        for n in heads:
            case = B.Case(n=n, N=args.rows, D=args.hidden, V=args.vocab, dtype=dtype,
                          per_head=args.per_head, backward=not args.forward_only,
                          device=args.device)
            print(f"{case.label()}:", file=sys.stderr, flush=True)
            rows = B.compare(case, paths=args.paths, repeats=args.repeats,
                             memory=not args.no_memory,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
            table = B.format_table(case, rows)
            print(table + "\n", flush=True)
            out.append(table + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out))
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="mtp-ext", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time and peak memory of the loss paths, side by side")
    b.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4], help="numbers of heads n")
    b.add_argument("--rows", type=int, default=4096, help="rows per head N (batch x sequence)")
    b.add_argument("--hidden", type=int, default=1024, help="hidden size D")
    b.add_argument("--vocab", type=int, default=32768, help="vocabulary size V")
    b.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    b.add_argument("--paths", nargs="+", default=None, help="subset of: fused reference "
                   "compiled torch_chunked gemm_floor")
    b.add_argument("--per-head", action="store_true", help="one unembedding per head")
    b.add_argument("--forward-only", action="store_true", help="time the forward alone")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.cmd == "bench":
        from . import benchmark as B
        args.paths = tuple(args.paths or B.PATHS)
        bad = [p for p in args.paths if p not in B.PATHS]
        if bad:
            ap.error(f"unknown path(s) {bad}; choose from {B.PATHS}")
        if min(args.heads) < 1 or min(args.rows, args.hidden, args.vocab) < 1:
            ap.error("--heads, --rows, --hidden and --vocab must be positive")
        return bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
