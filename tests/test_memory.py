"""No rows x V tensor: the peak memory of a fused forward+backward stays within the workspace
budget above its outputs, the same for 1 and 4 heads, while rows x V x 4 bytes is far above it.
Measured by the benchmark's probe: the peak RSS rise over a warm step, in a fresh process."""
import pytest

from mtp_ext import benchmark as B

MiB = 1 << 20
BUDGET = 64 * MiB
N, D, V = 2048, 256, 32768


def extra_over_gradients(path, n, dtype):
    peak = B.peak_memory(path, B.Case(n=n, N=N, D=D, V=V, dtype=dtype))
    assert peak is not None, "the memory probe failed (see stderr)"
    elt = 4 if dtype == "fp32" else 2
    grads = (n * N * D + V * D) * elt
    return peak - grads


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_peak_memory_is_flat_and_within_budget(dtype):
    extra = {}
    for n in (1, 4):
        # outputs: the gradients, and for 16-bit inputs the fp32 accumulator of dW (docs/design.md)
        extra[n] = extra_over_gradients("fused", n, dtype) - (V * D * 4 if dtype == "bf16" else 0)
        logits_bytes = n * N * V * 4
        assert logits_bytes >= 4 * BUDGET
        assert extra[n] <= 1.1 * BUDGET + 8 * MiB, (n, extra[n] / MiB)
    assert abs(extra[4] - extra[1]) <= 0.1 * BUDGET, {k: v / MiB for k, v in extra.items()}


def test_reference_path_is_caught_materializing_logits():
    """The probe detects a rows x V allocation: the reference path must exceed it."""
    assert extra_over_gradients("reference", 1, "fp32") >= N * V * 4
