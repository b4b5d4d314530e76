"""The fused loss with the unembedding split by vocabulary rows across the ranks of a process
group (as Megatron-LM's vocab-parallel cross-entropy).

Every rank holds the same hidden states and targets and one contiguous block of vocabulary rows
of the weight (and bias): rank r holds rows [start_r, start_r + V_r), in rank order; shards may
be uneven. Each rank runs the fused chunked kernels on its shard (torch.ops.mtp_ext.
fused_ce_stats): per row the shard's max, sum of exp(z - max), sum of z, the target logit (0 when
another shard holds the target) and the argmax. Three all-reduces combine them, a few numbers per
row and never logits:
    MAX of the max (4 bytes/row in fp32), SUM of (rescaled sum of exp, sum of z, z_target)
    (12 bytes/row), MIN of the global argmax candidates (8 bytes/row).
The loss of each row then follows docs/design.md with the global lse and V. Backward recomputes the
shard's logits chunk by chunk (torch.ops.mtp_ext.fused_ce_backward with the global lse) and
all-reduces the gradient of hidden (D values per row); the weight and bias gradients of a shard
stay on their rank. That is 4 GEMMs per row on each shard against 3 without sharding: the
gradient needs the global lse, known only after the forward's all-reduce.

The loss is the same number on every rank; call backward on every rank. Eager mode only: the
collectives are not traced by torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import ops  # noqa: F401  (loads the library and registers the ops)
from .outputs import head_scale


def vocab_shard(vocab_size: int, group=None, rank: Optional[int] = None) -> Tuple[int, int]:
    """[start, end) of the vocabulary rows that `rank` (default: this process's rank in `group`)
    holds when vocab_size rows are split as evenly as possible in rank order (the first
    vocab_size % world ranks get one row more). Any other contiguous split works too."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group) if rank is None else rank
    base, extra = divmod(vocab_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def exchange_shapes(vocab_local: int, hidden_size: int, group) -> Tuple[int, int]:
    """All-gathers each rank's (V_r, D): returns this rank's vocabulary offset and the global V.
    Raises ValueError on every rank when the ranks disagree on D."""
    table = _all_gather_ints([vocab_local, hidden_size], group)
    if len({d for _, d in table}) != 1:
        raise ValueError(f"vocab-parallel ranks disagree on the hidden size D: "
                         f"{[d for _, d in table]} (in rank order)")
    rank = dist.get_rank(group)
    return sum(v for v, _ in table[:rank]), sum(v for v, _ in table)


def failed_ranks(failed: bool, group) -> list:
    """The ranks of the group that rejected their arguments, known to every rank, so that all
    of them raise rather than some waiting in a collective."""
    return [r for r, (f,) in enumerate(_all_gather_ints([int(failed)], group)) if f]


def _all_gather_ints(values, group) -> list:
    mine = torch.tensor(values, dtype=torch.int64, device=_collective_device(group))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).cpu().tolist()


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ShardedRows(torch.autograd.Function):
    """Per-row loss [n, N] (acc dtype, 0 at ignored rows) and top-1 correctness of n heads whose
    unembedding is this rank's vocabulary shard."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss,
                softcap, chunk_rows, start, total, group):
        stats, argmax = torch.ops.mtp_ext.fused_ce_stats(
            hidden, weight, bias, targets, ignore_index, softcap, start, total, chunk_rows)
        local_max = stats[..., 0]
        row_max = local_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([stats[..., 1] * torch.exp(local_max - row_max), stats[..., 2],
                            stats[..., 3]], dim=-1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        sum_exp, sum_z, z_target = sums.unbind(-1)
        valid = targets != ignore_index
        # docs/design.md, "Loss of one row" (csrc/common/ce_math.h row_loss), with the global lse
        # and V; ignored rows have loss 0. A second form of row_loss, kept because the shards'
        # statistics combine here: tests/test_distributed.py ties it to the op (float64, 1e-12).
        lse = torch.where(valid, row_max + torch.log(sum_exp), 0.0)
        eps = label_smoothing
        loss = (1.0 - eps) * (lse - z_target) + z_loss * lse * lse
        if eps != 0.0:
            loss = loss + eps * (lse - sum_z / total)
        loss = torch.where(valid, loss, 0.0)
        # top-1: the first index of the global max (torch.argmax's tie rule)
        candidate = torch.where((local_max == row_max) & (argmax >= 0), argmax,
                                torch.full_like(argmax, total))
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
        correct = ((candidate == targets) & valid).to(loss.dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_rows, start, total)
        ctx.group = group
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, chunk_rows, start, total = ctx.options
        want = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        dh, dw, db = torch.ops.mtp_ext.fused_ce_backward(
            grad_loss.to(lse.dtype).contiguous(), hidden, weight, bias, targets, lse,
            ignore_index, label_smoothing, z_loss, softcap, chunk_rows, want, start, total)
        if want[0]:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        return ((dh if want[0] else None, dw if want[1] else None, db if want[2] else None)
                + (None,) * 9)


def sharded_loss(p, start: int, total: int, group):
    """(loss, stats [n, 3]) as the fused op returns them, for the prepared arguments p
    (mtp_ext._checks.Prepared) whose weight is this rank's vocabulary shard."""
    rows, correct = ShardedRows.apply(
        p.hidden, p.weight, p.bias, p.targets, p.ignore_index, float(p.label_smoothing),
        float(p.z_loss), float(p.softcap), int(p.chunk_size or 0), start, total, group)
    valid = p.targets != p.ignore_index
    counts = valid.sum(1)
    loss_sum = rows.sum(1)
    if p.reduction == "none":
        loss = rows
    else:
        loss = (head_scale(p.head_weights.to(rows.dtype), counts, p.reduction) * loss_sum).sum()
    stats = torch.stack([loss_sum.detach().double(), correct.sum(1).double(), counts.double()], 1)
    return loss, stats
