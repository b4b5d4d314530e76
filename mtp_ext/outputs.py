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
