"""The public loss functions: fused, chunked, never materializing rows x V logits."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from ._checks import Prepared, prepare_mtp, prepare_single
from .outputs import MTPLossOutput, head_summary


def _run(p: Prepared):
    return ops.fused_ce(p.hidden, p.weight, p.bias, p.targets, p.head_weights,
                        ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
                        z_loss=p.z_loss, softcap=p.softcap, reduction=p.reduction,
                        chunk_size=p.chunk_size)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    """cross_entropy(softcap(hidden @ weight.T + bias), targets) + z_loss * lse**2, fused.

    hidden [..., D], weight [V, D], targets [...] (integer), bias [V]. Returns a float32 scalar
    (float64 for float64 inputs), or the per-row loss shaped like targets for reduction "none".
    chunk_size: rows per chunk (default: as many as fit a 64 MiB fp32 workspace).
    """
    p = prepare_single(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                       softcap, reduction, chunk_size)
    loss, _, stats, _, _, _ = _run(p)
    if reduction == "none":
        return loss.reshape(p.lead_shape)
    if reduction == "mean":  # torch's mean over no valid row is nan
        loss = torch.where(stats[0, 2] > 0, loss, torch.full_like(loss, float("nan")))
    return loss


def mtp_loss(hidden: Union[torch.Tensor, Sequence[torch.Tensor]], weight: torch.Tensor,
             labels: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
             head_weights=None, ignore_index: int = -100, label_smoothing: float = 0.0,
             z_loss: float = 0.0, softcap: Optional[float] = None, reduction: str = "mean",
             shift: bool = True, chunk_size: Optional[int] = None) -> MTPLossOutput:
    """The multi-token prediction loss of n heads: sum_k head_weights[k] * L_k.

    hidden: [n, ..., T, D] or a sequence of n tensors [..., T, D]. weight: [V, D] shared or
    [n, V, D] per head; bias [V] or [n, V]. shift=True: labels [..., T] are the token ids and
    head k at position t predicts labels[..., t + k + 1]; shift=False: labels [n, ..., T] are the
    targets of each head. L_k is the mean (or sum) over head k's valid rows; a head without any
    adds nothing. reduction "none" gives the per-token loss [n, ..., T] (0 at ignored rows).
    """
    p = prepare_mtp(hidden, weight, labels, bias, head_weights, ignore_index, label_smoothing,
                    z_loss, softcap, reduction, shift, chunk_size)
    loss, _, stats, _, _, _ = _run(p)
    if reduction == "none":
        loss = loss.reshape((p.n,) + p.lead_shape)
    return MTPLossOutput(loss, *head_summary(stats[:, 0], stats[:, 1], stats[:, 2]))


class MTPLoss(nn.Module):
    """mtp_loss with its options held: `MTPLoss(z_loss=1e-4)(hidden, weight, labels)`."""

    def __init__(self, *, head_weights=None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, reduction: str = "mean", shift: bool = True,
                 chunk_size: Optional[int] = None, impl: str = "fused"):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        self.options = dict(head_weights=head_weights, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                            reduction=reduction, shift=shift, chunk_size=chunk_size)
        self.impl = impl

    def forward(self, hidden, weight, labels, bias=None) -> MTPLossOutput:
        if self.impl == "fused":
            return mtp_loss(hidden, weight, labels, bias=bias, **self.options)
        from . import reference
        return reference.mtp_loss(hidden, weight, labels, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
