"""mtp_loss: n heads, shift semantics, shared or per-head weights, against the reference path
in float64 and against the sum of per-head linear_cross_entropy."""
import pytest
import torch

import mtp_ext
from mtp_ext import reference

from conftest import IGNORE, as64, loss_and_grads, norm_err, on, rel_err

# every test on every device (conftest.device), or in both CPU layouts of fp32/fp64 logits
# (conftest.cpu_layout)


def mtp_inputs(n, B, T, D, V, dtype=torch.float32, *, seed, per_head=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, B, T, D, generator=g, dtype=torch.float64).to(dtype)
    wshape = (n, V, D) if per_head else (V, D)
    w = (torch.randn(*wshape, generator=g, dtype=torch.float64) * D ** -0.5 * 2).to(dtype)
    b = None
    if bias:
        b = torch.randn(*wshape[:-1], generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = IGNORE
    return h, w, b, labels


def shifted_targets(labels, n):
    T = labels.shape[-1]
    out = torch.full((n,) + labels.shape, IGNORE)
    for k in range(n):
        out[k, ..., : max(T - k - 1, 0)] = labels[..., k + 1:]
    return out


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_mtp_against_float64_reference(per_head, reduction, bias, device):
    n, B, T, D, V = 3, 2, 9, 12, 67
    h, w, b, labels = mtp_inputs(n, B, T, D, V, seed=17 + per_head, per_head=per_head, bias=bias)
    kw = dict(reduction=reduction, head_weights=[1.0, 0.5, 0.25], z_loss=1e-3,
              label_smoothing=0.05, softcap=5.0)
    go = torch.rand(n, B, T, dtype=torch.float64) + 0.5 if reduction == "none" else None
    dev_labels = labels.to(device)
    fn = lambda h, w, b: mtp_ext.mtp_loss(h, w, dev_labels, bias=b, chunk_size=5, **kw)
    rf = lambda h, w, b: reference.mtp_loss(h, w, labels, bias=b, **kw)
    loss, grads = loss_and_grads(fn, on(device, h, w, b), *on(device, go))
    ref, rgrads = loss_and_grads(rf, (as64(h), as64(w), as64(b)), go)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= 1e-5
    for a, r in zip(grads, rgrads):
        if r is not None:
            assert rel_err(a, r) <= 1e-5
    out, rout = fn(*on(device, h, w, b)), rf(as64(h), as64(w), as64(b))
    torch.testing.assert_close(out.head_losses.cpu(), rout.head_losses.float(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(out.head_accuracy.cpu(), rout.head_accuracy.float())
    assert torch.equal(out.head_tokens.cpu(), rout.head_tokens)


def test_mtp_equals_sum_of_linear_cross_entropy(cpu_layout):
    n, B, T, D, V = 4, 3, 10, 16, 50
    h, w, _, labels = mtp_inputs(n, B, T, D, V, seed=5)
    hw = torch.tensor([1.0, 0.7, 0.3, 0.2])
    out = mtp_ext.mtp_loss(h, w, labels, head_weights=hw)
    targets = shifted_targets(labels, n)
    total = sum(hw[k] * mtp_ext.linear_cross_entropy(h[k], w, targets[k]) for k in range(n))
    torch.testing.assert_close(out.loss, total, rtol=1e-6, atol=1e-6)
    for k in range(n):
        torch.testing.assert_close(out.head_losses[k],
                                   mtp_ext.linear_cross_entropy(h[k], w, targets[k]))
    # head k has T - k - 1 targets per sequence, minus the ignored label
    valid = (targets != IGNORE).sum(dim=(1, 2))
    assert torch.equal(out.head_tokens, valid)


def test_shift_false_and_list_input_agree_with_shift_true(cpu_layout):
    n, B, T, D, V = 3, 2, 8, 8, 40
    h, w, _, labels = mtp_inputs(n, B, T, D, V, seed=8)
    a = mtp_ext.mtp_loss(h, w, labels)
    b = mtp_ext.mtp_loss(list(h.unbind(0)), w, shifted_targets(labels, n), shift=False)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.head_losses, b.head_losses, equal_nan=True)


def test_head_k_targets_are_shifted_by_k_plus_1(cpu_layout):
    """A head whose hidden state makes label t+k+1 certain has near-zero loss; other shifts don't."""
    n, T, V, D = 3, 12, 16, 16
    labels = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(4))
    w = torch.eye(V) * 50.0  # logits = 50 * one_hot(hidden)
    h = torch.zeros(n, 1, T, D)
    for k in range(n):
        for t in range(T - k - 1):
            h[k, 0, t, labels[0, t + k + 1]] = 1.0
    out = mtp_ext.mtp_loss(h, w, labels)
    assert out.head_losses.max() < 1e-6
    assert torch.all(out.head_accuracy == 1)
    assert out.head_tokens.tolist() == [T - 1, T - 2, T - 3]
    wrong = mtp_ext.mtp_loss(h.roll(1, dims=0), w, labels)
    assert wrong.head_losses.min() > 1.0


def test_head_without_valid_rows_adds_nothing(cpu_layout):
    n, B, T, D, V = 3, 1, 2, 8, 20  # T = 2: heads 1 and 2 have no target
    h, w, _, _ = mtp_inputs(n, B, T, D, V, seed=1)
    labels = torch.tensor([[3, 7]])
    out = mtp_ext.mtp_loss(h, w, labels)
    ref = reference.mtp_loss(h, w, labels)
    assert out.head_tokens.tolist() == [1, 0, 0]
    assert torch.isnan(out.head_losses[1:]).all() and torch.isnan(out.head_accuracy[2])
    torch.testing.assert_close(out.loss, out.head_losses[0])
    torch.testing.assert_close(out.loss, ref.loss)


def test_mtp_loss_module():
    n, B, T, D, V = 2, 2, 6, 8, 30
    h, w, _, labels = mtp_inputs(n, B, T, D, V, seed=2)
    fused = mtp_ext.MTPLoss(z_loss=1e-3)(h, w, labels)
    ref = mtp_ext.MTPLoss(z_loss=1e-3, impl="reference")(h, w, labels)
    torch.testing.assert_close(fused.loss, ref.loss)
    assert "z_loss=0.001" in repr(mtp_ext.MTPLoss(z_loss=1e-3))
    with pytest.raises(ValueError, match="impl"):
        mtp_ext.MTPLoss(impl="triton")


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mtp_16bit_error_bounded(dtype, per_head, device):
    # per-head: one fp32 accumulator reused head by head (4 chunks per head here)
    n, B, T, D, V = 4, 2, 64, 32, 2053
    h, w, _, labels = mtp_inputs(n, B, T, D, V, seed=21, per_head=per_head)
    h16, w16 = h.to(dtype), w.to(dtype)
    dev_labels = labels.to(device)
    fn = lambda h, w: mtp_ext.mtp_loss(h, w, dev_labels, chunk_size=37)
    rf = lambda h, w: reference.mtp_loss(h, w, dev_labels if h.is_cuda else labels)
    loss, grads = loss_and_grads(fn, on(device, h16, w16))
    r16, g16 = loss_and_grads(rf, on(device, h16, w16))
    r64, g64 = loss_and_grads(rf, (as64(h16), as64(w16)))
    assert norm_err(loss, r64) <= 2 * norm_err(r16, r64) + torch.finfo(dtype).eps / 2
    for a, b, r in zip(grads, g16, g64):
        assert norm_err(a, r) <= 2 * norm_err(b, r) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 2, 3, 5], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [None, "shared", "per_head"])
@pytest.mark.parametrize("weight", ["shared", "per_head"])
def test_bias_and_weight_per_head_or_shared(weight, bias, reduction, chunk_size, dtype, device):
    """Every weight x bias combination, with chunks that span heads (None: one chunk of all
    rows; 2 and 5 straddle the 3-row heads) and that end on them (3): loss and all gradients
    against float64. bf16 with one chunk of all rows and a shared weight takes the weight's
    gradient as one direct bf16 GEMM, unless the bias is per head (the chunks then stop at heads
    and the gradient accumulates)."""
    n, N, D, V = 3, 3, 4, 7
    g = torch.Generator().manual_seed(100 + n * N)
    h = torch.randn(n, N, D, generator=g, dtype=torch.float64)
    w = torch.randn(*((n,) if weight == "per_head" else ()), V, D, generator=g,
                    dtype=torch.float64)
    b = None if bias is None else torch.randn(*((n,) if bias == "per_head" else ()), V,
                                              generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n, N), generator=g)
    targets[0, 1] = IGNORE  # not a row that a chunk of 2 or 5 carries over a head boundary
    go = torch.rand(n, N, generator=g, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = dict(shift=False, reduction=reduction, head_weights=[1.0, 0.5, 0.25])
    cast = lambda t: None if t is None else t.to(dtype)
    dev_targets = targets.to(device)
    fn = lambda h, w, b: mtp_ext.mtp_loss(h, w, dev_targets, bias=b, chunk_size=chunk_size, **kw)
    rf = lambda h, w, b: reference.mtp_loss(h, w, targets, bias=b, **kw)
    loss, grads = loss_and_grads(fn, on(device, cast(h), cast(w), cast(b)), *on(device, go))
    ref, rgrads = loss_and_grads(rf, (h, w, b), go)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    err = rel_err if dtype != torch.bfloat16 else norm_err
    assert err(loss, ref) <= tol
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert (a is None) == (r is None), name
        if r is not None:
            assert err(a, r) <= tol, name
