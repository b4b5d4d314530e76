"""Argument checks and normalization shared by the fused path and the reference path, so that
both give the same errors: ValueError, TypeError or IndexError naming the argument and value."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Prepared:
    hidden: torch.Tensor            # [n, M, D]
    weight: torch.Tensor            # [V, D] or [n, V, D]
    bias: Optional[torch.Tensor]    # [V] or [n, V]
    targets: torch.Tensor           # [n, M] int64
    head_weights: torch.Tensor      # [n] float32 (float64 for float64 inputs)
    lead_shape: tuple               # the shape of one head's rows, for reduction "none"
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float                  # 0.0 = off
    reduction: str
    chunk_size: Optional[int]

    @property
    def n(self) -> int:
        return self.hidden.shape[0]


def _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ls = float(label_smoothing)
    if not (0.0 <= ls <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    zl = float(z_loss)
    if not (zl >= 0.0) or math.isinf(zl):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    cap = 0.0
    if softcap is not None:
        cap = float(softcap)
        if not (cap > 0.0) or math.isinf(cap):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return ls, zl, cap


def _check_tensor(name, t, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                         f"got shape {tuple(t.shape)}")


def _check_hidden_size(name, t):
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has a hidden size D of 0: shape {tuple(t.shape)}")


def _check_float(name, t):
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_targets_dtype(name, t):
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_weight(hidden, weight, bias, n, allow_per_head):
    _check_tensor("weight", weight, (2, 3) if allow_per_head else (2,))
    _check_float("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden and weight must be on the same device, got {hidden.device} "
                         f"and {weight.device}")
    D = hidden.shape[-1]
    if weight.shape[-1] != D:
        raise ValueError(f"weight's last dimension {weight.shape[-1]} does not match hidden's "
                         f"hidden size D = {D}")
    if weight.shape[-2] == 0:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if weight.dim() == 3 and weight.shape[0] != n:
        raise ValueError(f"per-head weight has {weight.shape[0]} heads, hidden has n = {n}")
    V = weight.shape[-2]
    if bias is not None:
        _check_tensor("bias", bias, (1, 2) if allow_per_head else (1,))
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias must be on weight's device {weight.device}, got {bias.device}")
        if bias.shape[-1] != V or (bias.dim() == 2 and bias.shape[0] != n):
            want = f"[{V}]" + (f" or [{n}, {V}]" if allow_per_head else "")
            raise ValueError(f"bias must have shape {want}, got {tuple(bias.shape)}")


def shift_labels(labels: torch.Tensor, n: int, ignore_index: int) -> torch.Tensor:
    """[n, ..., T] targets from token ids [..., T]: head k at position t gets labels[..., t+k+1],
    ignore_index where that is past the end."""
    T = labels.shape[-1]
    heads = []
    for k in range(n):
        s = min(k + 1, T)
        pad = labels.new_full(labels.shape[:-1] + (s,), ignore_index)
        heads.append(torch.cat([labels[..., s:], pad], dim=-1))
    return torch.stack(heads)


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int, name="targets"):
    """IndexError naming the first target outside [0, V) that is not ignore_index."""
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        return  # the op checks on its device; this check only gives a nicer position
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"{name}{list(pos)} = {int(targets[pos])} is outside [0, {vocab}) and "
                         f"is not ignore_index ({ignore_index})")


def prepare_single(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                   softcap, reduction, chunk_size, vocab=None) -> Prepared:
    """vocab: the vocabulary size targets are checked against (default: weight's rows; the
    global size for a vocab-parallel weight shard)."""
    ls, zl, cap = _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction,
                                 chunk_size)
    _check_tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least 1 dimension [..., D], got a scalar")
    _check_float("hidden", hidden)
    _check_hidden_size("hidden", hidden)
    _check_tensor("targets", targets)
    _check_targets_dtype("targets", targets)
    _check_weight(hidden, weight, bias, 1, allow_per_head=False)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets must be on hidden's device {hidden.device}, got {targets.device}")
    check_target_range(targets, vocab or weight.shape[0], ignore_index, "targets")
    D = hidden.shape[-1]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return Prepared(hidden.reshape(1, -1, D), weight, bias, targets.reshape(1, -1).long(),
                    torch.ones(1, dtype=acc, device=hidden.device), tuple(targets.shape),
                    ignore_index, ls, zl, cap, reduction, chunk_size)


def prepare_mtp(hidden, weight, labels, bias, head_weights, ignore_index, label_smoothing, z_loss,
                softcap, reduction, shift, chunk_size, vocab=None) -> Prepared:
    """vocab: as for prepare_single."""
    ls, zl, cap = _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction,
                                 chunk_size)
    if isinstance(hidden, (list, tuple)):
        if len(hidden) == 0:
            raise ValueError("hidden is an empty sequence: give at least one head")
        for i, h in enumerate(hidden):
            _check_tensor(f"hidden[{i}]", h)
            if h.shape != hidden[0].shape or h.dtype != hidden[0].dtype:
                raise ValueError(f"hidden[{i}] has shape {tuple(h.shape)} and dtype {h.dtype}, "
                                 f"hidden[0] has {tuple(hidden[0].shape)} and {hidden[0].dtype}")
        if hidden[0].dim() < 2:
            raise ValueError(f"each hidden tensor must be [..., T, D], got shape "
                             f"{tuple(hidden[0].shape)}")
        hidden = torch.stack(list(hidden))
    else:
        _check_tensor("hidden", hidden)
        if hidden.dim() < 3:
            raise ValueError(f"hidden must be [n, ..., T, D], got shape {tuple(hidden.shape)}")
    _check_float("hidden", hidden)
    _check_hidden_size("hidden", hidden)
    n, D = hidden.shape[0], hidden.shape[-1]
    _check_weight(hidden, weight, bias, n, allow_per_head=True)
    _check_tensor("labels", labels)
    _check_targets_dtype("labels", labels)
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on hidden's device {hidden.device}, got {labels.device}")
    lead = tuple(hidden.shape[1:-1])
    if shift:
        if tuple(labels.shape) != lead:
            hint = ""
            if tuple(labels.shape) == tuple(hidden.shape[:-1]):
                hint = (f"; hidden {tuple(hidden.shape)} reads as n = {n} heads of shape "
                        f"{lead}: is its head dimension missing? (one head: hidden[None])")
            raise ValueError(f"labels shape {tuple(labels.shape)} must be hidden's [..., T] = "
                             f"{lead} when shift=True{hint}")
        check_target_range(labels, vocab or weight.shape[-2], ignore_index, "labels")
        targets = shift_labels(labels.long(), n, ignore_index)
    else:
        if tuple(labels.shape) != (n,) + lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} must be [n, ..., T] = "
                             f"{(n,) + lead} when shift=False")
        check_target_range(labels, vocab or weight.shape[-2], ignore_index, "labels")
        targets = labels.long()
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if head_weights is None:
        hw = torch.ones(n, dtype=acc, device=hidden.device)
    else:
        hw = torch.as_tensor(head_weights, dtype=acc, device=hidden.device).detach()
        if hw.dim() != 1 or hw.shape[0] != n:
            raise ValueError(f"head_weights must have n = {n} entries, got shape {tuple(hw.shape)}")
    return Prepared(hidden.reshape(n, -1, D), weight, bias, targets.reshape(n, -1), hw, lead,
                    ignore_index, ls, zl, cap, reduction, chunk_size)
