"""MTPLossOutput and the per-head statistics shared by both paths."""
from __future__ import annotations

from typing import NamedTuple

import torch


class MTPLossOutput(NamedTuple):
    loss: torch.Tensor           # scalar (mean, sum) or [n, ..., T] (none)
    head_losses: torch.Tensor    # [n] float32, mean loss of each head's valid rows; nan if none
    head_accuracy: torch.Tensor  # [n] float32, top-1 accuracy of each head; nan if no valid row
    head_tokens: torch.Tensor    # [n] int64, valid rows of each head


def head_summary(loss_sum, correct, count):
    """Detached per-head mean loss, accuracy and token count from per-head sums."""
    loss_sum, correct, count = loss_sum.detach(), correct.detach(), count.detach()
    return (
        (loss_sum / count).float(),  # 0 / 0 = nan for a head without valid rows
        (correct / count).float(),
        count.round().long(),
    )


def head_scale(head_weights, count, reduction):
    """The factor of each head's loss sum in the loss of n heads, [n]: sum, its weight w_k;
    mean, w_k / count_k (a head without valid rows has loss sum 0 and counts once, so adds 0).
    loss = (head_scale * loss_sum).sum(), and each valid row's loss gradient is its head's
    factor. The one definition of the reduction in Python: the plain path
    (mtp_ext.reference), the vocab-parallel loss and the op's recomputing backward
    (mtp_ext.ops) use it; the op's forward computes the same in csrc/driver.cpp (the tests
    compare it with the plain path)."""
    if reduction == "sum":
        return head_weights
    if reduction == "mean":
        return head_weights / count.clamp_min(1).to(head_weights.dtype)
    raise ValueError(f"head_scale: reduction must be 'mean' or 'sum', got {reduction!r}")
