"""pytest-benchmark: the fused MTP loss against the pure-PyTorch paths and the GEMM floor.

    pytest bench/ --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

Grid: n in {1, 2, 4, 8}; V in {32768, 128256}; fp32 and bf16; shared and per-head
unembedding; forward only and forward+backward; D = 1024. Rows per head: N = 4096 at V = 32768
(docs/design.md's CPU reference shape) and N = 1024 at V = 128256, so that rows x V, the work of one
head, stays about the same (the full vocabulary at N = 4096 would take about four times as long
on 2 cores). Each case is one benchmark group, its five paths side by side; each path's peak
memory, measured in a fresh process, is in the benchmark's extra_info (so in the saved JSON).
Select with -k, e.g. -k "n4 and v32768 and shared and fwdbwd". MTP_BENCH_SMALL=1 runs a few
cases at small shapes (the CI smoke run)."""
import itertools

import pytest

from mtp_ext import benchmark as B

from conftest import SMALL, scaled

ROWS_FOR_VOCAB = {32768: 4096, 128256: 1024}


def grid():
    for n, V, dt, per_head, backward in itertools.product(
            (1, 2, 4, 8), ROWS_FOR_VOCAB, ("fp32", "bf16"), (False, True), (True, False)):
        case = B.Case(n=n, N=ROWS_FOR_VOCAB[V], V=V, dtype=dt, per_head=per_head,
                      backward=backward)
        if SMALL and not (V == 32768 and n in (1, 8) and per_head != backward
                          and per_head == (dt == "bf16")):
            continue  # smoke run: n = 1 and 8; fp32 shared fwd+bwd, bf16 per-head fwd
        yield case


def case_id(c: B.Case) -> str:
    return (f"n{c.n}-v{c.V}-{c.dtype}-{'perhead' if c.per_head else 'shared'}-"
            f"{'fwdbwd' if c.backward else 'fwd'}")


@pytest.mark.parametrize("path", B.PATHS)
@pytest.mark.parametrize("case", list(grid()), ids=case_id)
def test_mtp_loss(benchmark, case, path):
    case = scaled(case)
    benchmark.group = case.label()
    step = B.make_step(path, case)
    step()  # warm up: compile, allocate
    if path != "gemm_floor":
        peak = B.peak_memory(path, case)
        benchmark.extra_info["peak_memory_mib"] = None if peak is None else peak / 2**20
    benchmark.extra_info["case"] = case.label()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
