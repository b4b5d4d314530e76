"""What only a CUDA device has: the CUDA ops against the CPU ops, the device checks of the C++
ops, CUDA graph capture, the 16-bit weight-gradient fallback and peak memory. The accuracy,
option, error and opcheck tests run on CUDA through the `device` fixture of their own files
(conftest.device). Skipped where no CUDA device is present (all of CI)."""
import pytest
import torch

import mtp_ext
from mtp_ext import switches

from conftest import HAS_CUDA, loss_and_grads, make_inputs, norm_err, on, rel_err

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def cuda(t):
    return None if t is None else t.cuda()


def test_cuda_matches_cpu_mtp_loss():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 2, 33, 64, generator=g)
    w = torch.randn(4, 517, 64, generator=g) * 0.1
    labels = torch.randint(0, 517, (2, 33), generator=g)
    a = mtp_ext.mtp_loss(h, w, labels, z_loss=1e-3)
    b = mtp_ext.mtp_loss(h.cuda(), w.cuda(), labels.cuda(), z_loss=1e-3)
    torch.testing.assert_close(b.loss.cpu(), a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.head_accuracy.cpu(), a.head_accuracy)


def test_cuda_op_refuses_tensors_on_another_device():
    """Past the Python checks, the C++ op names the tensor on the wrong device."""
    h, w, t = torch.randn(1, 5, 8, device="cuda"), torch.randn(9, 8, device="cuda"), \
        torch.randint(0, 9, (1, 5))
    with pytest.raises(RuntimeError, match="targets is on cpu but hidden is on cuda"):
        torch.ops.mtp_ext.fused_ce(h, w, None, t, torch.ones(1, device="cuda"), -100, 0.0, 0.0,
                                   0.0, 1, 0, [False] * 3)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.mtp_ext.fused_ce(h, w.cpu(), None, t.cuda(), torch.ones(1, device="cuda"), -100,
                                   0.0, 0.0, 0.0, 1, 0, [False] * 3)


def test_cuda_graph_capture_and_replay():
    """The op captures into a CUDA graph (no host synchronisation while capturing) and replays
    to the eager result."""
    h, w, _, y = on("cuda", *make_inputs(64, 32, 1000, torch.float32, seed=3))
    hw = torch.ones(1, device="cuda")
    args = (h[None], w, None, y[None], hw, -100, 0.0, 1e-3, 0.0, 1, 0, [True, True, False])
    eager = torch.ops.mtp_ext.fused_ce(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.mtp_ext.fused_ce(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.mtp_ext.fused_ce(*args)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured[:2] + captured[3:5], eager[:2] + eager[3:5]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_head", [False, True])
def test_cuda_16bit_weight_gradient_slabs(per_head):
    """The fallback for torch versions whose out_dtype addmm refuses an fp32 accumulator
    (the cuda_dw16 switch forces it): within twice the out_dtype path's error."""
    g = torch.Generator().manual_seed(6)
    n, N, D, V = 2, 300, 64, 4096
    h = torch.randn(n, N, D, generator=g, dtype=torch.float64)
    w = torch.randn(*((n,) if per_head else ()), V, D, generator=g, dtype=torch.float64) * 0.2
    y = torch.randint(0, V, (n, N), generator=g)
    fn = lambda h, w: mtp_ext.mtp_loss(h, w, y.cuda(), shift=False, chunk_size=128).loss
    _, g64 = loss_and_grads(lambda h, w: mtp_ext.mtp_loss(h, w, y, shift=False).loss, (h, w))
    _, fast = loss_and_grads(fn, (h.bfloat16().cuda(), w.bfloat16().cuda()))
    with switches.forced(cuda_dw16="slabs"):
        _, slabs = loss_and_grads(fn, (h.bfloat16().cuda(), w.bfloat16().cuda()))
    assert norm_err(slabs[1], g64[1]) <= 2 * norm_err(fast[1], g64[1]) + 1e-4
    assert rel_err(slabs[0], fast[0]) <= 1e-6  # the input gradient does not take this path


def test_cuda_peak_memory_flat_in_heads():
    D, V, N = 256, 32768, 2048
    extra = {}
    for n in (1, 4):
        h = torch.randn(n, 1, N, D, device="cuda", requires_grad=True)
        w = (torch.randn(V, D, device="cuda") * 0.05).requires_grad_()
        labels = torch.randint(0, V, (1, N), device="cuda")
        # warm-up: cuBLAS's workspace and the allocator's first blocks are not the loss's memory
        mtp_ext.mtp_loss(h, w, labels).loss.backward()
        h.grad = w.grad = None
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
