"""The CPU's logits layout chosen by measurement (csrc/cpu/layout_choice.h): each chunk shape
large enough to time tries both layouts on its first six chunks, keeps the faster, and every
chunk, tried or kept, gives the float64 reference's result."""
import pytest
import torch

import mtp_ext
from mtp_ext import switches

from test_correctness import check_against_f64

# c x D x V = 2^30 multiply-adds per chunk: the smallest shape that is timed (kLayoutTrialWork)
C, D = 256, 256


def trials_of(V, dtype):
    return [t for t in switches.cpu_layout_trials() if t["V"] == V and t["dtype"] == dtype]


@pytest.mark.parametrize("dtype,V,reduction", [
    (torch.float32, 16384, "mean"),       # forward with gradients: the folded vocabulary chunks
    (torch.float32, 16384 + 1, "none"),   # the backward recomputing from lse
    (torch.bfloat16, 16384 + 2, "mean"),
])
def test_trials_choose_the_faster_and_every_chunk_is_right(dtype, V, reduction):
    """8 chunks of one call: 6 tried in both layouts (row, vocab, vocab, row, row, vocab), 2 in
    the kept one; the loss and gradients within the float64 bounds of test_correctness; the kept
    layout is the one of the smaller median time per row."""
    name = str(dtype).removeprefix("torch.")
    assert not trials_of(V, name)
    with switches.forced(cpu_layout="auto"):
        check_against_f64(dtype, 8 * C, D, V, {}, bias=False, reduction=reduction,
                          chunk_size=C, seed=V)
    (t,) = [t for t in trials_of(V, name) if t["work"] == (4 if reduction == "none" else 0) | 3]
    assert t["chunks"] == 6 and t["chunk_rows"] == C and t["D"] == D
    assert t["choice"] == ("vocab" if t["vocab_us"] < t["row_us"] else "row")
    assert t["row_us"] > 0 and t["vocab_us"] > 0


def test_one_chunk_calls_try_across_calls():
    """A shape whose calls are one chunk each (a 16-bit shared weight whose logits fit) tries the
    layouts call by call: undecided after five calls, decided after six, and the result of each
    call equal to the first's up to rounding."""
    V = 4096 + 3
    h = torch.randn(1, 1, C * 4, D).bfloat16().requires_grad_()
    w = (torch.randn(V, D) * D ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, V, (1, 1, C * 4))
    first = None
    with switches.forced(cpu_layout="auto"):
        for call in range(6):
            h.grad = w.grad = None
            out = mtp_ext.mtp_loss(h, w, y, shift=False)
            out.loss.backward()
            (t,) = trials_of(V, "bfloat16")
            assert t["chunks"] == call + 1 and t["chunk_rows"] == C * 4
            assert (t["choice"] is None) == (call < 5)
            got = (out.loss.detach().double(), h.grad.double(), w.grad.double())
            first = first or got
            for a, b in zip(got, first):
                assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("forced", ["row", "vocab"])
def test_forced_layout_and_small_chunks_are_not_timed(forced):
    """A forced layout (the cpu_layout switch) and chunks below 2^30 multiply-adds never try."""
    V = 16384 + 10 + len(forced)
    h = torch.randn(1, 1, 2 * C, D)
    w = torch.randn(V, D) * D ** -0.5
    y = torch.randint(0, V, (1, 1, 2 * C))
    with switches.forced(cpu_layout=forced):
        mtp_ext.mtp_loss(h, w, y, shift=False, chunk_size=C)
    with switches.forced(cpu_layout="auto"):
        mtp_ext.mtp_loss(h[..., : C // 2, :], w, y[..., : C // 2], shift=False,
                         chunk_size=C // 2)  # 2^29 per chunk
    assert not trials_of(V, "float32")
