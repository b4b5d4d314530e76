"""Every bad input of docs/design.md gives a clear Python exception naming the argument and value,
from both the fused and the reference path."""
import pytest
import torch

import mtp_ext
from mtp_ext import reference

N, D, V = 6, 4, 10


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, D, generator=g), torch.randn(V, D, generator=g),
            torch.randint(0, V, (N,), generator=g))


LCE_CASES = [
    # (kwargs changes, exception, message fragment)
    (dict(targets=torch.tensor([0, 1, 2, 10, 3, 4])), IndexError, "= 10"),
    (dict(targets=torch.tensor([0, 1, -5, 1, 3, 4])), IndexError, "= -5"),
    (dict(targets=torch.zeros(N)), TypeError, "targets must be an integer"),
    (dict(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, "targets shape"),
    (dict(weight=torch.randn(V, D + 1)), ValueError, "hidden size D = 4"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(hidden=torch.randn(N, D, dtype=torch.float16)), TypeError, "same dtype"),
    (dict(hidden=torch.randint(0, 3, (N, D))), TypeError, "hidden must be float32"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(V, dtype=torch.float64)), TypeError, "bias must have weight's dtype"),
    (dict(reduction="avg"), ValueError, "'avg'"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in [0, 1], got 1.5"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0, got 0.0"),
    (dict(softcap=-3), ValueError, "softcap"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0, got -0.0001"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(weight=torch.randn(2, V, D)), ValueError, "weight must have 2 dimensions"),
]


@pytest.mark.parametrize("impl", [mtp_ext, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("change,exc,msg", LCE_CASES, ids=[str(i) for i in range(len(LCE_CASES))])
def test_linear_cross_entropy_errors(impl, change, exc, msg):
    h, w, y = inputs()
    kw = dict(hidden=h, weight=w, targets=y)
    kw.update(change)
    with pytest.raises(exc, match=None) as info:
        impl.linear_cross_entropy(**kw)
    assert msg in str(info.value)


@pytest.mark.parametrize("chunk_rows", [0, 2])
def test_target_out_of_range_raised_by_the_op_itself(device, chunk_rows):
    """Even past the Python checks (as under torch.compile), each op raises IndexError naming
    the first bad row, whichever chunk holds it, on every device."""
    h, w, y = (t.to(device) for t in inputs())
    y = y.clone()
    y[3], y[4] = 99, -7
    hw = torch.ones(1, device=device)
    with pytest.raises(IndexError, match="flattened row 3 "):
        torch.ops.mtp_ext.fused_ce(h[None], w, None, y[None], hw, -100, 0.0, 0.0, 0.0, 1,
                                   chunk_rows, [False] * 3)
    with pytest.raises(IndexError, match="flattened row 3 "):
        torch.ops.mtp_ext.fused_ce_backward(torch.ones(1, N, device=device), h[None], w, None,
                                            y[None], torch.ones(1, N, device=device), -100, 0.0,
                                            0.0, 0.0, chunk_rows, [True] * 3)


def mtp_base():
    g = torch.Generator().manual_seed(1)
    return dict(hidden=torch.randn(3, 2, 5, D, generator=g), weight=torch.randn(V, D, generator=g),
                labels=torch.randint(0, V, (2, 5), generator=g))


MTP_CASES = [
    (dict(head_weights=[1.0, 2.0]), ValueError, "head_weights must have n = 3 entries"),
    (dict(weight=torch.randn(2, V, D)), ValueError, "per-head weight has 2 heads, hidden has n = 3"),
    (dict(bias=torch.randn(2, V)), ValueError, "bias must have shape"),
    (dict(labels=torch.randint(0, V, (2, 6))), ValueError, "labels shape (2, 6)"),
    (dict(labels=torch.randint(0, V, (2, 5)), shift=False), ValueError, "when shift=False"),
    (dict(labels=torch.full((2, 5), V)), IndexError, f"labels[0, 0] = {V}"),
    (dict(hidden=torch.randn(5, D)), ValueError, "hidden must be [n, ..., T, D]"),
    (dict(hidden=[torch.randn(2, 5, D), torch.randn(2, 4, D)]), ValueError, "hidden[1] has shape"),
    (dict(hidden=[]), ValueError, "empty sequence"),
    (dict(reduction="mean_per_token"), ValueError, "reduction"),
]


@pytest.mark.parametrize("impl", [mtp_ext, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("change,exc,msg", MTP_CASES, ids=[str(i) for i in range(len(MTP_CASES))])
def test_mtp_loss_errors(impl, change, exc, msg):
    kw = mtp_base()
    kw.update(change)
    with pytest.raises(exc) as info:
        impl.mtp_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)
    assert msg in str(info.value)


def test_hidden_size_zero():
    for impl in (mtp_ext, reference):
        with pytest.raises(ValueError, match=r"hidden has a hidden size D of 0: shape \(4, 0\)"):
            impl.linear_cross_entropy(torch.randn(4, 0), torch.randn(10, 0),
                                      torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="hidden size D of 0"):
            impl.mtp_loss(torch.randn(2, 1, 5, 0), torch.randn(10, 0),
                          torch.zeros(1, 5, dtype=torch.long))


def test_mtp_loss_without_head_dimension_names_the_likely_cause():
    h, w = torch.randn(2, 8, D), torch.randn(V, D)
    labels = torch.randint(0, V, (2, 8))
    for impl in (mtp_ext, reference):
        with pytest.raises(ValueError, match=r"is its head dimension missing\? \(one head: "
                                             r"hidden\[None\]\)"):
            impl.mtp_loss(h, w, labels)
        impl.mtp_loss(h[None], w, labels)  # as the hint says
