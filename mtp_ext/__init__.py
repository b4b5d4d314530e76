"""mtp_ext: fused chunked linear cross-entropy for multi-token prediction.

    loss = mtp_ext.linear_cross_entropy(hidden, lm_head.weight, targets)
    out = mtp_ext.mtp_loss(head_hidden, lm_head.weight, input_ids)   # n heads, shift=True
    out.loss.backward()
"""
from . import ops  # noqa: F401  (registers the ops, fake kernels and autograd)
from . import reference, switches, vocab_parallel
from .loss import MTPLoss, linear_cross_entropy, mtp_loss
from .ops import cpu_capability
from .outputs import MTPLossOutput

__all__ = ["linear_cross_entropy", "mtp_loss", "MTPLoss", "MTPLossOutput", "cpu_capability",
           "reference", "switches", "vocab_parallel"]
__version__ = "0.1.0"
