"""The torch ops behind the fused loss: fake kernels for torch.compile, and autograd.

torch.ops.mtp_ext.fused_ce computes the loss of n heads in chunks (csrc/driver.cpp) and, for
reductions mean and sum, the gradients in the same pass; backward then only scales them by the
incoming gradient. For reduction none (or when the forward kept no gradients) backward calls
torch.ops.mtp_ext.fused_ce_backward, which recomputes the logits chunk by chunk.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library, which registers the ops)
from .outputs import head_scale


def cpu_capability() -> str:
    """The CPU row kernels in use: "avx512", "avx2" or "default". The library carries all three
    (x86-64; elsewhere only "default") and runs the widest this CPU has, unless the
    cpu_capability switch (mtp_ext.switches; MTP_EXT_CPU_CAPABILITY=default|avx2|avx512, read
    once) names a lower one (one the CPU lacks: RuntimeError at the next op)."""
    return torch.ops.mtp_ext._cpu_capability()


cpu_capability()  # reads the switches' environment once: a bad value fails the import, named

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grads_kept(reduction: int, grad_mask) -> bool:
    return reduction != 0 and any(grad_mask)


@torch.library.register_fake("mtp_ext::fused_ce")
def _fused_ce_fake(hidden, weight, bias, targets, head_weights, ignore_index, label_smoothing,
                   z_loss, softcap, reduction, chunk_rows, grad_mask):
    n, N, _ = hidden.shape
    acc = _acc_dtype(hidden)
    loss = hidden.new_empty((n, N) if reduction == 0 else (), dtype=acc)
    lse = hidden.new_empty((n, N), dtype=acc)
    stats = hidden.new_empty((n, 3), dtype=torch.float64)
    kept = _grads_kept(reduction, grad_mask)
    empty = hidden.new_empty((0,))
    dh = hidden.new_empty(hidden.shape) if kept and grad_mask[0] else empty
    dw = weight.new_empty(weight.shape) if kept and grad_mask[1] else hidden.new_empty((0,))
    db = (bias.new_empty(bias.shape) if kept and grad_mask[2] and bias is not None
          else hidden.new_empty((0,)))
    return loss, lse, stats, dh, dw, db


@torch.library.register_fake("mtp_ext::fused_ce_backward")
def _fused_ce_backward_fake(grad_rows, hidden, weight, bias, targets, lse, ignore_index,
                            label_smoothing, z_loss, softcap, chunk_rows, grad_mask,
                            vocab_start=0, vocab_total=0):
    dh = hidden.new_empty(hidden.shape) if grad_mask[0] else hidden.new_empty((0,))
    dw = weight.new_empty(weight.shape) if grad_mask[1] else hidden.new_empty((0,))
    db = (bias.new_empty(bias.shape) if grad_mask[2] and bias is not None
          else hidden.new_empty((0,)))
    return dh, dw, db


@torch.library.register_fake("mtp_ext::fused_ce_stats")
def _fused_ce_stats_fake(hidden, weight, bias, targets, ignore_index, softcap, vocab_start,
                         vocab_total, chunk_rows):
    n, N, _ = hidden.shape
    return (hidden.new_empty((n, N, 4), dtype=_acc_dtype(hidden)),
            hidden.new_empty((n, N), dtype=torch.int64))


def _is_eager(t: torch.Tensor) -> bool:
    """A real tensor in eager mode (not traced by torch.compile, AOTAutograd or fake tensors),
    whose value may be inspected."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._is_functional_tensor(t))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, head_weights, ignore_index, label_smoothing, z_loss, softcap,
     reduction, chunk_rows, grad_mask) = inputs
    _, lse, stats, dh, dw, db = output
    # Only the loss is differentiable; without this autograd would hand backward zero tensors
    # the size of the gradients for the other outputs.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, stats, dh, dw, db)
    ctx.kept = _grads_kept(reduction, grad_mask)
    ctx.kept_mask = tuple(grad_mask)
    ctx.has_bias = bias is not None
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_rows)
    ctx.reduction = reduction
    if ctx.kept:
        ctx.save_for_backward(dh, dw, db)
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, head_weights, lse, stats)


def _backward(ctx, g_loss, g_lse, g_stats, g_dh, g_dw, g_db):
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2])
    none = (None,) * 9
    if g_loss is None:
        return (None, None, None) + none
    if ctx.kept:
        dh, dw, db = ctx.saved_tensors
        # Eager backward with a unit incoming gradient (loss.backward()) hands the kept gradients
        # over as they are: autograd releases them from ctx first, so no copy is made.
        unit = _is_eager(g_loss) and bool(g_loss == 1)
        out = [None, None, None]
        for i, (t, w, k) in enumerate(zip((dh, dw, db), want, ctx.kept_mask)):
            if not w:
                continue
            if not k:
                raise RuntimeError("mtp_ext: the forward did not compute this gradient; call the "
                                   "loss with requires_grad set as it will be used")
            out[i] = t if unit else t * g_loss.to(t.dtype)
        return tuple(out) + none
    hidden, weight, bias, targets, head_weights, lse, stats = ctx.saved_tensors
    ignore_index, label_smoothing, z_loss, softcap, chunk_rows = ctx.options
    if ctx.reduction == 0:
        grad_rows = g_loss
    else:
        valid = targets != ignore_index
        scale = head_scale(head_weights.to(lse.dtype), stats[:, 2],
                           "mean" if ctx.reduction == 1 else "sum")
        grad_rows = g_loss.to(lse.dtype) * scale[:, None] * valid
    dh, dw, db = torch.ops.mtp_ext.fused_ce_backward(
        grad_rows, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss,
        softcap, chunk_rows, list(want))
    return (dh if want[0] else None, dw if want[1] else None, db if want[2] else None) + none


torch.library.register_autograd("mtp_ext::fused_ce", _backward, setup_context=_setup_context)


def fused_ce(hidden, weight, bias, targets, head_weights, *, ignore_index, label_smoothing,
             z_loss, softcap, reduction, chunk_size):
    """Calls the op on normalized arguments (see mtp_ext._checks.Prepared)."""
    if torch.is_grad_enabled():
        grad_mask = [hidden.requires_grad, weight.requires_grad,
                     bias is not None and bias.requires_grad]
    else:
        grad_mask = [False, False, False]
    return torch.ops.mtp_ext.fused_ce(
        hidden, weight, bias, targets, head_weights, ignore_index, float(label_smoothing),
        float(z_loss), float(softcap), REDUCTION_CODES[reduction], int(chunk_size or 0), grad_mask)
