"""pytest-benchmark: the fused MTP loss against the pure-PyTorch paths and the GEMM floor, at the
CPU reference shapes of design.md (n in {1, 2, 4}, N = 4096, D = 1024, V = 32768, fp32 and bf16,
forward+backward). Run: pytest bench/ --benchmark-only [--benchmark-save=NAME]
[--benchmark-compare]. Each case's peak memory, measured in a fresh process, is stored in the
benchmark's extra_info (so in the saved JSON)."""
import pytest

from mtp_ext import benchmark as B

from conftest import scaled

CASES = [B.Case(n=n, dtype=dt) for dt in ("fp32", "bf16") for n in (1, 2, 4)]


@pytest.mark.parametrize("path", B.PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c.n}-{c.dtype}")
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
