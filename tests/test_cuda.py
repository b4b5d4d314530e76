"""The CUDA kernels: against the CPU ops and float64 references, opcheck, torch.compile, device
errors and peak memory. Skipped where no CUDA device is present (all of CI)."""
import pytest
import torch

import mtp_ext
from mtp_ext import reference

from conftest import as64, loss_and_grads, make_inputs, norm_err, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine")
OPTS = [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)]


def cuda(t):
    return None if t is None else t.cuda()


@pytest.mark.parametrize("opts", OPTS, ids=["plain", "all-options"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,V", [(1, 8, 33), (77, 64, 1003), (256, 128, 50257)])
def test_cuda_against_float64(opts, reduction, dtype, N, D, V):
    h, w, b, y = make_inputs(N, D, V, dtype, seed=N + V, bias=True)
    go = torch.rand(N, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = dict(reduction=reduction, chunk_size=64, **opts)
    loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy,
                                 (cuda(h), cuda(w), cuda(y), cuda(b)), cuda(go), **kw)
    ref, rgrads = loss_and_grads(reference.linear_cross_entropy, (as64(h), as64(w), y, as64(b)),
                                 go, **kw)
    loss, grads = loss.cpu(), [g.cpu() for g in grads if g is not None]
    rgrads = [g for g in rgrads if g is not None]
    if dtype == torch.float32:
        assert rel_err(loss, ref) <= 1e-5
        assert all(rel_err(g, r) <= 1e-5 for g, r in zip(grads, rgrads))
    else:
        r16, g16 = loss_and_grads(reference.linear_cross_entropy,
                                  (cuda(h), cuda(w), cuda(y), cuda(b)), cuda(go), **kw)
        assert norm_err(loss, ref) <= 2 * norm_err(r16.cpu(), ref) + torch.finfo(dtype).eps / 2
        for g, r, q in zip(grads, rgrads, g16):
            if q is not None:
                assert norm_err(g, r) <= 2 * norm_err(q.cpu(), r) + 1e-4


def test_cuda_matches_cpu_mtp_loss():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 2, 33, 64, generator=g)
    w = torch.randn(4, 517, 64, generator=g) * 0.1
    labels = torch.randint(0, 517, (2, 33), generator=g)
    a = mtp_ext.mtp_loss(h, w, labels, z_loss=1e-3)
    b = mtp_ext.mtp_loss(h.cuda(), w.cuda(), labels.cuda(), z_loss=1e-3)
    torch.testing.assert_close(b.loss.cpu(), a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.head_accuracy.cpu(), a.head_accuracy)


def test_cuda_opcheck_and_compile():
    h = torch.randn(2, 5, 8, device="cuda", requires_grad=True)
    w = torch.randn(17, 8, device="cuda", requires_grad=True)
    t = torch.randint(0, 17, (2, 5), device="cuda")
    hw = torch.ones(2, device="cuda")
    for red in (0, 1, 2):
        torch.library.opcheck(torch.ops.mtp_ext.fused_ce.default,
                              (h, w, None, t, hw, -100, 0.1, 0.01, 2.0, red, 3, [True, True, False]))
    fn = torch.compile(lambda h, w: mtp_ext.mtp_loss(h, w, t[0].reshape(1, 5)).loss, fullgraph=True)
    hh = torch.randn(3, 1, 5, 8, device="cuda", requires_grad=True)
    fn(hh, w).backward()
    assert torch.isfinite(hh.grad).all()


def test_cuda_bad_target_raises_after_the_op():
    h, w = torch.randn(6, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    y = torch.tensor([0, 1, 2, 99, 3, 4], device="cuda")
    with pytest.raises(IndexError, match="flattened row 3"):
        mtp_ext.linear_cross_entropy(h, w, y)


def test_cuda_peak_memory_flat_in_heads():
    D, V, N = 256, 32768, 2048
    extra = {}
    for n in (1, 4):
        h = torch.randn(n, 1, N, D, device="cuda", requires_grad=True)
        w = (torch.randn(V, D, device="cuda") * 0.05).requires_grad_()
        labels = torch.randint(0, V, (1, N), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mtp_ext.mtp_loss(h, w, labels).loss.backward()
        torch.cuda.synchronize()
        extra[n] = torch.cuda.max_memory_allocated() - base - h.grad.nbytes - w.grad.nbytes
        assert extra[n] <= 1.1 * (64 << 20) + (8 << 20), extra
        assert n * N * V * 4 >= 4 * (64 << 20)
    assert abs(extra[4] - extra[1]) <= 0.1 * (64 << 20), extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_vocab_shard_ops_match_cpu(dtype):
    """fused_ce_stats and the sharded fused_ce_backward on CUDA against the CPU ops."""
    N, D, V, lo, hi = 70, 32, 301, 100, 250
    h, w, b, y = make_inputs(N, D, V, dtype, seed=4, bias=True)
    args = (h[None], w[lo:hi].contiguous(), b[lo:hi].contiguous(), y[None])
    st_cpu, am_cpu = torch.ops.mtp_ext.fused_ce_stats(*args, -100, 4.0, lo, V, 16)
    st_gpu, am_gpu = torch.ops.mtp_ext.fused_ce_stats(*map(cuda, args), -100, 4.0, lo, V, 16)
    assert rel_err(st_gpu.cpu(), st_cpu) <= 1e-5
    assert torch.equal(am_gpu.cpu(), am_cpu)
    lse = torch.rand(1, N, dtype=st_cpu.dtype) + 5.0
    g = torch.rand(1, N, dtype=st_cpu.dtype)
    tail = (-100, 0.1, 1e-3, 4.0, 16, [True] * 3, lo, V)
    want = torch.ops.mtp_ext.fused_ce_backward(g, *args[:3], y[None], lse, *tail)
    got = torch.ops.mtp_ext.fused_ce_backward(cuda(g), *map(cuda, args[:3]), cuda(y[None]),
                                              cuda(lse), *tail)
    assert all(rel_err(a.cpu(), e) <= 1e-5 for a, e in zip(got, want))
