"""Linear layers for cached decoding on CPU: the product on a weight prepacked for oneDNN.

A decoding step multiplies a few rows (one token, or a speculative step's candidates) by each
weight. ATen's CPU matmul (MKL) costs about 3x as much for 4 rows as for 1; oneDNN's linear on a
prepacked weight costs about the same for 1 to 8 rows (docs/model.md has the measurement). So
inside `packed_linears()` a `Linear` without autograd on a CPU fp32/bf16 weight runs on a copy of
its weight packed once, packed again when the weight changes (its storage, version or dtype).
The packed_decoding switch (mtp_ext.switches; MTP_EXT_PACKED_DECODING=0) turns it off (ATen's
F.linear), as do builds of torch without oneDNN.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import switches

_state = threading.local()
_DTYPES = (torch.float32, torch.bfloat16)
_packs: dict = {}  # id(weight) -> (weakref to the weight, key, packed weight)


def available() -> bool:
    return (switches.packed_decoding()
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@contextlib.contextmanager
def packed_linears(enabled: bool = True):
    """Within it, Linear layers run without autograd on prepacked weights where they can."""
    before = getattr(_state, "on", False)
    _state.on = enabled and available()
    try:
        yield
    finally:
        _state.on = before


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    hit = _packs.get(id(weight))
    if hit is None or hit[0]() is not weight or hit[1] != key:
        for i in [i for i, h in _packs.items() if h[0]() is None]:  # weights gone
            del _packs[i]
        hit = (weakref.ref(weight), key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16))
        _packs[id(weight)] = hit
    return hit[2]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias; on a prepacked weight inside packed_linears()."""
    if (getattr(_state, "on", False) and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == weight.dtype and weight.dtype in _DTYPES):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), _packed(weight),
                                               None, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs on a prepacked weight inside
    packed_linears()."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) if self.bias is not None else linear(x, self.weight)
