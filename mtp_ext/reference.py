"""The plain-PyTorch twins of mtp_ext.linear_cross_entropy and mtp_ext.mtp_loss: the same
signatures, checks and outputs, computed the obvious way (full [rows, V] logits per head). This
is the path tests and benchmarks compare against."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import Prepared, prepare_mtp, prepare_single
from .outputs import MTPLossOutput, head_scale, head_summary


def _head_rows(h, w, b, y, p: Prepared):
    """Per-row loss and top-1 correctness of one head: h [M, D], y [M]."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = F.linear(h, w, b).to(acc)  # logits in the input dtype, as eager PyTorch computes them
    if p.softcap > 0:
        z = p.softcap * torch.tanh(z / p.softcap)
    valid = y != p.ignore_index
    loss = F.cross_entropy(z, y, ignore_index=p.ignore_index, reduction="none",
                           label_smoothing=p.label_smoothing)
    if p.z_loss > 0:
        loss = loss + p.z_loss * torch.logsumexp(z, dim=-1).square() * valid
    correct = (z.argmax(dim=-1) == y) & valid
    return loss, correct


def _heads(p: Prepared):
    rows, correct = [], []
    for k in range(p.n):
        w = p.weight if p.weight.dim() == 2 else p.weight[k]
        b = None if p.bias is None else (p.bias if p.bias.dim() == 1 else p.bias[k])
        l, c = _head_rows(p.hidden[k], w, b, p.targets[k], p)
        rows.append(l)
        correct.append(c)
    loss_rows = torch.stack(rows)                                  # [n, M]
    valid = p.targets != p.ignore_index
    count = valid.sum(1).to(loss_rows.dtype)
    loss_sum = loss_rows.sum(1)
    return loss_rows, loss_sum, torch.stack(correct).sum(1).to(loss_rows.dtype), count


def linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    p = prepare_single(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                       softcap, reduction, chunk_size)
    loss_rows, loss_sum, _, count = _heads(p)
    if reduction == "none":
        return loss_rows.reshape(p.lead_shape)
    if reduction == "sum":
        return loss_sum[0]
    return loss_sum[0] / count[0]  # nan without valid rows, as torch


def mtp_loss(hidden, weight, labels, *, bias=None, head_weights=None, ignore_index: int = -100,
             label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
             reduction: str = "mean", shift: bool = True,
             chunk_size: Optional[int] = None) -> MTPLossOutput:
    p = prepare_mtp(hidden, weight, labels, bias, head_weights, ignore_index, label_smoothing,
                    z_loss, softcap, reduction, shift, chunk_size)
    loss_rows, loss_sum, correct, count = _heads(p)
    if reduction == "none":
        loss = loss_rows.reshape((p.n,) + p.lead_shape)
    else:
        loss = (head_scale(p.head_weights.to(loss_rows.dtype), count, reduction) * loss_sum).sum()
    return MTPLossOutput(loss, *head_summary(loss_sum, correct, count))
