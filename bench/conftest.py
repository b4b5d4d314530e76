import os

import pytest

from mtp_ext import benchmark as B

# MTP_BENCH_SMALL=1 shrinks every case (a quick smoke run of the benchmark itself).
SMALL = os.environ.get("MTP_BENCH_SMALL") == "1"


def scaled(case: B.Case) -> B.Case:
    if not SMALL:
        return case
    return B.Case(n=case.n, N=128, D=64, V=2048, dtype=case.dtype, per_head=case.per_head,
                  backward=case.backward, device=case.device)
