"""The vocab-parallel loss on R gloo ranks against the single-process fused loss, forward +
backward, and the bytes each rank sends to the collectives per row.

    python bench/bench_vocab_parallel.py [--heads 1] [--rows 4096] [--hidden 1024]
                                         [--vocab 32768] [--ranks 2] [--repeats 3]

The single process uses all the threads (torch.get_num_threads()); each rank gets its share of
them, so both use the same cores. Bytes are counted from the tensors handed to
torch.distributed by mtp_ext.vocab_parallel (what each rank contributes to an all-reduce or
all-gather, not the wire traffic of the backend's algorithm).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtp_ext
from mtp_ext import vocab_parallel
from mtp_ext.training import distributed as mdist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(a):
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[a.dtype]
    h = torch.randn(a.heads, a.rows, a.hidden, generator=g).to(dtype)
    w = (torch.randn(a.vocab, a.hidden, generator=g) / a.hidden ** 0.5).to(dtype)
    y = torch.randint(0, a.vocab, (a.heads, a.rows), generator=g)
    return h, w, y


def step(h, w, y, group=None):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = mtp_ext.mtp_loss(h, w, y, shift=False, process_group=group)
    out.loss.backward()
    return out.loss.item()


def timed(fn, repeats, sync=lambda: None):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class ByteCounter:
    """Wraps the collectives that mtp_ext.vocab_parallel calls and adds up their tensors."""

    def __init__(self):
        self.bytes = {}
        self.phase = "forward"

    def install(self):
        real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

        def all_reduce(t, *args, **kw):
            self.add(t.numel() * t.element_size())
            return real_all_reduce(t, *args, **kw)

        def all_gather(parts, t, *args, **kw):
            self.add(t.numel() * t.element_size())
            return real_all_gather(parts, t, *args, **kw)

        vocab_parallel.dist.all_reduce = all_reduce
        vocab_parallel.dist.all_gather = all_gather

    def add(self, n):
        self.bytes[self.phase] = self.bytes.get(self.phase, 0) + n


def rank_main(rank, a, threads, init_file, result_file):
    torch.set_num_threads(threads)
    mdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=a.ranks)
    h, w, y = make_inputs(a)
    lo, hi = vocab_parallel.vocab_shard(a.vocab)
    ws = w[lo:hi].contiguous()
    loss = step(h, ws, y, dist.group.WORLD)
    median, times = timed(lambda: step(h, ws, y, dist.group.WORLD), a.repeats, dist.barrier)
    counter = ByteCounter()
    counter.install()
    hh, wl = h.detach().requires_grad_(), ws.detach().requires_grad_()
    out = mtp_ext.mtp_loss(hh, wl, y, shift=False, process_group=dist.group.WORLD)
    counter.phase = "backward"
    out.loss.backward()
    if rank == 0:
        torch.save({"median": median, "times": times, "loss": loss, "bytes": counter.bytes},
                   result_file)
    mdist.shutdown(mdist.DistContext(rank, a.ranks))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    a = p.parse_args(argv)
    total_threads = torch.get_num_threads()
    threads = max(1, total_threads // a.ranks)
    h, w, y = make_inputs(a)
    single_loss = step(h, w, y)
    single, single_times = timed(lambda: step(h, w, y), a.repeats)
    del h, w, y
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        mp.spawn(rank_main, args=(a, threads, os.path.join(tmp, "rdv"), result_file),
                 nprocs=a.ranks)
        r = torch.load(result_file, weights_only=True)
    rows = a.heads * a.rows
    print(f"vocab-parallel fused loss, forward+backward, n={a.heads} N={a.rows} D={a.hidden} "
          f"V={a.vocab} {a.dtype}; {a.ranks} gloo ranks x {threads} threads vs 1 process x "
          f"{total_threads} threads; torch {torch.__version__}")
    print(f"single process: median {single:.3f} s of {[round(t, 3) for t in single_times]}, "
          f"loss {single_loss:.6f}")
    print(f"vocab-parallel: median {r['median']:.3f} s of {[round(t, 3) for t in r['times']]}, "
          f"loss {r['loss']:.6f}  ->  {r['median'] / single:.2f}x the single-process time")
    for phase, b in r["bytes"].items():
        print(f"bytes sent to collectives per rank, {phase}: {b} = {b / rows:.1f} per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
