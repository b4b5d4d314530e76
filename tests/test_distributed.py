"""Two gloo ranks on the CPU: the vocab-parallel loss against the single-process fused loss,
and the reference model under DDP and FSDP against a single-process step."""
import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks
import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

F32, F64 = torch.float32, torch.float64
CASES = [
    dict(seed=1, n=1, V=64, dtype=F64, per_head=False, bias=False, uneven=False, opts={}),
    dict(seed=2, n=3, V=101, dtype=F64, per_head=False, bias=True, uneven=True,
         opts=dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    dict(seed=3, n=2, V=96, dtype=F64, per_head=True, bias=True, uneven=False,
         opts=dict(reduction="none", label_smoothing=0.2)),
    dict(seed=4, n=3, V=257, dtype=F32, per_head=False, bias=False, uneven=True,
         opts=dict(reduction="sum", head_weights=[1.0, 0.5, 0.25], z_loss=1e-4)),
    dict(seed=5, n=2, V=130, dtype=F32, per_head=True, bias=False, uneven=True,
         opts=dict(chunk_size=7, softcap=10.0, label_smoothing=0.05)),
]


def test_vocab_parallel_matches_single_process():
    run_ranks(dist_workers.vocab_parallel_matches_fused, CASES)


def test_vocab_parallel_errors_raise_on_every_rank():
    run_ranks(dist_workers.vocab_parallel_errors)
