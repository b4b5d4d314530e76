"""gradcheck in float64, torch.library.opcheck on every op, torch.compile(fullgraph=True)."""
import pytest
import torch

import mtp_ext
from mtp_ext import reference, switches

from conftest import IGNORE, make_inputs, on, rel_err

# every test on every device (conftest.device), or in both CPU layouts of fp32/fp64 logits
# (conftest.cpu_layout)

OPTS = [dict(), dict(label_smoothing=0.1, z_loss=0.01, softcap=2.0)]


@pytest.mark.parametrize("opts", OPTS, ids=["plain", "all-options"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_linear_cross_entropy(opts, reduction, device):
    h, w, b, y = on(device, *make_inputs(6, 3, 7, torch.float64, seed=3, bias=True))
    args = [t.requires_grad_() for t in (h, w, b)]
    fn = lambda h, w, b: mtp_ext.linear_cross_entropy(h, w, y, b, reduction=reduction,
                                                     chunk_size=4, **opts)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("per_head", [False, True])
def test_gradcheck_mtp_loss(per_head, cpu_layout):
    n, T, D, V = 3, 5, 3, 6
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, 2, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*((n,) if per_head else ()), V, D, generator=g, dtype=torch.float64,
                    requires_grad=True)
    labels = torch.randint(0, V, (2, T), generator=g)
    fn = lambda h, w: mtp_ext.mtp_loss(h, w, labels, head_weights=[1.0, 0.5, 2.0], z_loss=0.01,
                                       softcap=3.0, chunk_size=3).loss
    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-8, rtol=1e-6)


def _op_args(dtype, reduction, grad, bias=True, per_head=False, device="cpu"):
    n, N, D, V = 2, 5, 4, 9
    g = torch.Generator().manual_seed(7)
    new = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)
    h = new(n, N, D)
    w = new(*((n,) if per_head else ()), V, D)
    b = new(*((n,) if per_head else ()), V) if bias else None
    t = torch.randint(0, V, (n, N), generator=g).to(device)
    t[0, 1] = IGNORE
    hw = torch.tensor([1.0, 0.5], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                      device=device)
    return (h, w, b, t, hw, IGNORE, 0.1, 0.01, 2.0, reduction, 3, [grad, grad, grad and bias])


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck_fused_ce(reduction, dtype, per_head, device):
    args = _op_args(dtype, reduction, grad=True, per_head=per_head, device=device)
    torch.library.opcheck(torch.ops.mtp_ext.fused_ce.default, args)
    no_grad = _op_args(dtype, reduction, grad=False, bias=False, per_head=per_head, device=device)
    torch.library.opcheck(torch.ops.mtp_ext.fused_ce.default, no_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_fused_ce_backward(dtype, device):
    h, w, b, t, hw, ii, ls, zl, cap, _, cr, _ = _op_args(dtype, 0, grad=False, device=device)
    _, lse, *_ = torch.ops.mtp_ext.fused_ce(h, w, b, t, hw, ii, ls, zl, cap, 0, cr, [False] * 3)
    grad_rows = torch.rand(t.shape, dtype=lse.dtype, device=device)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.mtp_ext.fused_ce_backward.default,
                              (grad_rows, h, w, b, t, lse, ii, ls, zl, cap, cr, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_vocab_parallel_ops(dtype, device):
    h, w, b, t, hw, ii, ls, zl, cap, _, cr, _ = _op_args(dtype, 0, grad=False, device=device)
    V = w.shape[-2]
    lo, hi = 2, V - 3  # the middle of the vocabulary as one shard
    ws, bs = w[..., lo:hi, :].contiguous(), b[..., lo:hi].contiguous()
    torch.library.opcheck(torch.ops.mtp_ext.fused_ce_stats.default,
                          (h, ws, bs, t, ii, cap, lo, V, cr))
    _, lse, *_ = torch.ops.mtp_ext.fused_ce(h, w, b, t, hw, ii, ls, zl, cap, 0, cr, [False] * 3)
    grad_rows = torch.rand(t.shape, dtype=lse.dtype, device=device)
    torch.library.opcheck(torch.ops.mtp_ext.fused_ce_backward.default,
                          (grad_rows, h, ws, bs, t, lse, ii, ls, zl, cap, cr, [True] * 3, lo, V))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction, cpu_layout):
    torch._dynamo.reset()
    n, B, T, D, V = 3, 2, 7, 8, 31
    g = torch.Generator().manual_seed(9)
    h = torch.randn(n, B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    y = labels.reshape(-1)

    def step(fn_mtp, fn_lce, h, w, b):
        out = fn_mtp(h, w, labels, bias=b, z_loss=1e-3, softcap=5.0, reduction=reduction)
        single = fn_lce(h[0].reshape(-1, D), w, y, b, label_smoothing=0.1, reduction=reduction)
        return out.loss.sum() + single.sum(), out.head_losses

    def run(compiled):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        if compiled:
            fn = torch.compile(lambda *a: step(mtp_ext.mtp_loss, mtp_ext.linear_cross_entropy, *a),
                               fullgraph=True, backend="aot_eager")
        else:
            fn = lambda *a: step(reference.mtp_loss, reference.linear_cross_entropy, *a)
        total, heads = fn(*leaves)
        total.backward()  # through the compiled backward graph
        return total, heads, [t.grad for t in leaves]

    c_total, c_heads, c_grads = run(True)
    r_total, r_heads, r_grads = run(False)
    torch.testing.assert_close(c_total, r_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_heads, r_heads, rtol=1e-5, atol=1e-5)
    for a, r in zip(c_grads, r_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_forward_backward(device):
    torch._dynamo.reset()
    h, w, _, y = on(device, *make_inputs(20, 8, 40, torch.float32, seed=4))
    hh = h.clone().requires_grad_()
    fn = torch.compile(lambda h: mtp_ext.linear_cross_entropy(h, w, y, z_loss=1e-3),
                       fullgraph=True)
    loss = fn(hh)
    loss.backward()
    ref_h = h.clone().requires_grad_()
    ref = reference.linear_cross_entropy(ref_h, w, y, z_loss=1e-3)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hh.grad, ref_h.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_skips_gradients_and_eval_matches(cpu_layout):
    h, w, _, y = make_inputs(30, 8, 40, torch.float32, seed=6)
    hh = h.clone().requires_grad_()
    with torch.no_grad():
        a = mtp_ext.linear_cross_entropy(hh, w, y)
    assert not a.requires_grad
    out = torch.ops.mtp_ext.fused_ce(h.reshape(1, 30, 8), w, None, y.reshape(1, 30),
                                     torch.ones(1), IGNORE, 0.0, 0.0, 0.0, 1, 0, [False] * 3)
    assert all(t.numel() == 0 for t in out[3:])  # no gradient computed
    b = mtp_ext.linear_cross_entropy(hh, w, y)
    assert b.requires_grad
    torch.testing.assert_close(a, b.detach())


def test_only_weight_requires_grad(cpu_layout):
    h, w, _, y = make_inputs(30, 8, 40, torch.float32, seed=8)
    ww = w.clone().requires_grad_()
    mtp_ext.linear_cross_entropy(h, ww, y).backward()
    wr = w.clone().requires_grad_()
    reference.linear_cross_entropy(h, wr, y).backward()
    assert rel_err(ww.grad, wr.grad) < 1e-5


def test_opcheck_gemm_call_counter():
    """The CPU's diagnostic op (which 16-bit GEMM path ran) passes opcheck too, and counts."""
    info = torch.ops.mtp_ext._cpu_gemm16_info
    torch.library.opcheck(info.default, ())
    h, w, _, y = make_inputs(8, 4, 20, torch.bfloat16, seed=1)
    h, w = h.requires_grad_(), w.requires_grad_()
    for gemm16, products in (("native", [2, 0]), ("fp32", [0, 6])):
        before = info()[:3]
        with switches.forced(cpu_gemm16=gemm16):  # 2 chunks: dW accumulated in fp32
            mtp_ext.linear_cross_entropy(h, w, y, chunk_size=4).backward()
        after = info()[:3]
        assert [after[0] + after[1] - before[0] - before[1], after[2] - before[2]] == products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_takes_the_autocast_dtype(dtype, cpu_layout):
    """Under torch.autocast the loss takes hidden, weight and bias in the autocast dtype, as
    F.linear does (the loss stays fp32), and the gradients of fp32 leaves come back in fp32."""
    n, B, T, D, V = 2, 2, 6, 8, 40
    g = torch.Generator().manual_seed(13)
    h = torch.randn(n, B, T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    with torch.autocast("cpu", dtype=dtype):
        out = mtp_ext.mtp_loss(h, w, labels, bias=b, z_loss=1e-3)
        single = mtp_ext.linear_cross_entropy(h[0], w, labels, b)
    out.loss.backward()
    assert out.loss.dtype == single.dtype == torch.float32
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    leaves = [t.detach().to(dtype).requires_grad_() for t in (h, w, b)]
    want = mtp_ext.mtp_loss(leaves[0], leaves[1], labels, bias=leaves[2], z_loss=1e-3)
    want_single = mtp_ext.linear_cross_entropy(leaves[0][0], leaves[1], labels, leaves[2])
    want.loss.backward()
    assert torch.equal(out.loss, want.loss) and torch.equal(single, want_single)
    for got, ref in zip((h, w, b), leaves):
        assert torch.equal(got.grad, ref.grad.float())
