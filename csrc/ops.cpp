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
  // vocab_total > 0: weight (and bias) hold vocabulary rows [vocab_start, vocab_start + V) of
  // vocab_total, targets are global ids and lse the global one (vocab-parallel backward).
  m.def(
      "fused_ce_backward(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, int chunk_rows, bool[3] grad_mask, int vocab_start=0, int vocab_total=0) "
      "-> (Tensor, Tensor, Tensor)");
  // Vocab-parallel forward on one shard (rows [vocab_start, vocab_start + V) of vocab_total):
  // per row (max, sum of exp(z - max), sum of z, z_target or 0 if another shard holds the
  // target) [n, N, 4] and the argmax as a global id [n, N] int64 (-1 for ignored rows). The
  // caller combines the shards' statistics (mtp_ext/vocab_parallel.py).
  m.def(
      "fused_ce_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "int ignore_index, float softcap, int vocab_start, int vocab_total, int chunk_rows) "
      "-> (Tensor, Tensor)");
}
