// The op schemas, defined once. Device kernels register in csrc/cpu and csrc/cuda; fake kernels
// and autograd are registered from Python (mtp_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(mtp_ext, m) {
  // n heads of N rows each: hidden [n, N, D], weight [V, D] (shared) or [n, V, D], bias [V] or
  // [n, V], targets [n, N] int64, head_weights [n] float32.
  // reduction: 0 none, 1 mean, 2 sum. grad_mask: gradients of hidden, weight, bias to compute
  // during the forward (mean and sum only). chunk_rows <= 0: from the 64 MiB workspace budget.
  // Returns loss (scalar; [n, N] for none), lse [n, N], head_stats [n, 3] float64 (loss sum,
  // correct top-1, valid rows), grad_hidden, grad_weight, grad_bias (empty when not computed).
  m.def(
      "fused_ce(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor head_weights, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int reduction, "
      "int chunk_rows, bool[3] grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients recomputed chunk by chunk from lse, with a scale per row (grad_rows [n, N]):
  // used for reduction none, and for mean or sum when the forward did not keep gradients.
  m.def(
      "fused_ce_backward(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, int chunk_rows, bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
}
