"""The public loss functions: fused, chunked, never materializing rows x V logits."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from ._checks import Prepared, prepare_mtp, prepare_single
from .outputs import MTPLossOutput, head_summary


def _autocast(args):
    """Under torch.autocast, hidden, weight and bias (args 0, 1 and 3) in the autocast dtype, as
    F.linear would take them; the loss and its sums stay fp32, as cross_entropy's do. float64
    tensors are left alone, as autocast leaves them."""
    hidden = args[0]
    first = hidden[0] if isinstance(hidden, (list, tuple)) and len(hidden) else hidden
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return args
    dtype = torch.get_autocast_dtype(first.device.type)

    def cast(t):
        if isinstance(t, (list, tuple)):
            return [cast(x) for x in t]
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if ok else t
    return (cast(args[0]), cast(args[1]), args[2], cast(args[3])) + tuple(args[4:])


def _run(prepare, args, weight, process_group):
    """(prepared arguments, loss, stats [n, 3]) of the fused op, or of its vocab-parallel form
    when a process group is given (weight is then this rank's vocabulary shard)."""
    args = _autocast(args)
    weight = args[1]
    if process_group is None:
        p = prepare(*args)
        loss, _, stats, _, _, _ = ops.fused_ce(
            p.hidden, p.weight, p.bias, p.targets, p.head_weights, ignore_index=p.ignore_index,
            label_smoothing=p.label_smoothing, z_loss=p.z_loss, softcap=p.softcap,
            reduction=p.reduction, chunk_size=p.chunk_size)
        return p, loss, stats
    from . import vocab_parallel as vp
    shaped = isinstance(weight, torch.Tensor) and weight.dim() >= 2
    start, total = vp.exchange_shapes(weight.shape[-2] if shaped else 0,
                                      weight.shape[-1] if shaped else -1, process_group)
    try:
        p, error = prepare(*args, vocab=total), None
    except (TypeError, ValueError, IndexError) as e:
        p, error = None, e
    bad = vp.failed_ranks(error is not None, process_group)
    if error is not None:
        raise error
    if bad:
        raise RuntimeError(f"vocab-parallel loss: rank(s) {bad} of the process group rejected "
                           f"their arguments (their exceptions say why)")
    loss, stats = vp.sharded_loss(p, start, total, process_group)
    return p, loss, stats


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean",
                         chunk_size: Optional[int] = None, process_group=None) -> torch.Tensor:
    """cross_entropy(softcap(hidden @ weight.T + bias), targets) + z_loss * lse**2, fused.

    hidden [..., D], weight [V, D], targets [...] (integer), bias [V]. Returns a float32 scalar
    (float64 for float64 inputs), or the per-row loss shaped like targets for reduction "none".
    chunk_size: rows per chunk (default: as many as fit a 64 MiB workspace).
    process_group: vocab-parallel (mtp_ext.vocab_parallel): weight and bias are this rank's
    block of vocabulary rows, hidden and targets the same on every rank of the group.
    """
    p, loss, stats = _run(prepare_single, (hidden, weight, targets, bias, ignore_index,
                                           label_smoothing, z_loss, softcap, reduction,
                                           chunk_size), weight, process_group)
    if reduction == "none":
        return loss.reshape(p.lead_shape)
    if reduction == "mean":  # torch's mean over no valid row is nan
        loss = torch.where(stats[0, 2] > 0, loss, torch.full_like(loss, float("nan")))
    return loss


def mtp_loss(hidden: Union[torch.Tensor, Sequence[torch.Tensor]], weight: torch.Tensor,
             labels: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
             head_weights=None, ignore_index: int = -100, label_smoothing: float = 0.0,
             z_loss: float = 0.0, softcap: Optional[float] = None, reduction: str = "mean",
             shift: bool = True, chunk_size: Optional[int] = None,
             process_group=None) -> MTPLossOutput:
    """The multi-token prediction loss of n heads: sum_k head_weights[k] * L_k.

    hidden: [n, ..., T, D] or a sequence of n tensors [..., T, D]. weight: [V, D] shared or
    [n, V, D] per head; bias [V] or [n, V]. shift=True: labels [..., T] are the token ids and
    head k at position t predicts labels[..., t + k + 1]; shift=False: labels [n, ..., T] are the
    targets of each head. L_k is the mean (or sum) over head k's valid rows; a head without any
    adds nothing. reduction "none" gives the per-token loss [n, ..., T] (0 at ignored rows).
    process_group: vocab-parallel (mtp_ext.vocab_parallel): weight ([V_r, D] or [n, V_r, D])
    and bias are this rank's block of vocabulary rows, in rank order; hidden and labels are the
    same on every rank of the group, and so is the result.
    """
    p, loss, stats = _run(prepare_mtp, (hidden, weight, labels, bias, head_weights, ignore_index,
                                        label_smoothing, z_loss, softcap, reduction, shift,
                                        chunk_size), weight, process_group)
    if reduction == "none":
        loss = loss.reshape((p.n,) + p.lead_shape)
    return MTPLossOutput(loss, *head_summary(stats[:, 0], stats[:, 1], stats[:, 2]))


class MTPLoss(nn.Module):
    """mtp_loss with its options held: `MTPLoss(z_loss=1e-4)(hidden, weight, labels)`."""

    def __init__(self, *, head_weights=None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean", shift: bool = True,
                 chunk_size: Optional[int] = None, impl: str = "fused", process_group=None):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        if process_group is not None and impl != "fused":
            raise ValueError("process_group (vocab-parallel) needs impl='fused'")
        self.process_group = process_group
        self.options = dict(head_weights=head_weights, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                            reduction=reduction, shift=shift, chunk_size=chunk_size)
        self.impl = impl

    def forward(self, hidden, weight, labels, bias=None) -> MTPLossOutput:
        if self.impl == "fused":
            return mtp_loss(hidden, weight, labels, bias=bias, process_group=self.process_group,
                            **self.options)
        from . import reference
        return reference.mtp_loss(hidden, weight, labels, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
