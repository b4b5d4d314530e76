// The maths of one row of the fused linear cross-entropy (docs/design.md, "Loss of one row" and
// "Gradient"), written once for every device. No torch header: nvcc compiles this anywhere.
//
// T is the element type a kernel works on: a scalar (float, double) on CUDA and in scalar tails,
// a SIMD vector (at::vec::Vectorized<float>) in the CPU kernel. The only operations used on T are
// + - * and the functions of Math<T>, which each device provides for its own vector types.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace mtp {

template <class T>
struct Math;

template <>
struct Math<float> {
  static MTP_HD float exp(float x) { return ::expf(x); }
  static MTP_HD float log(float x) { return ::logf(x); }
  static MTP_HD float tanh(float x) { return ::tanhf(x); }
  static MTP_HD float lowest() { return -FLT_MAX; }
};

template <>
struct Math<double> {
  static MTP_HD double exp(double x) { return ::exp(x); }
  static MTP_HD double log(double x) { return ::log(x); }
  static MTP_HD double tanh(double x) { return ::tanh(x); }
  static MTP_HD double lowest() { return -DBL_MAX; }
};

// Options of the loss, fixed for one call.
struct LossOptions {
  int64_t vocab = 0;            // V: the logits of a row (this shard's, when vocab-parallel)
  int64_t ignore_index = -100;  // rows with this target have no loss and no gradient
  double label_smoothing = 0;   // eps
  double z_loss = 0;            // lam
  double softcap = 0;           // c; 0 = off
  // Vocab-parallel: the row's logits are columns [vocab_start, vocab_start + vocab) of a
  // vocabulary of vocab_total (0: not sharded, vocab_total = vocab). Targets are global ids.
  int64_t vocab_start = 0;
  int64_t vocab_total = 0;

  MTP_HD int64_t total_vocab() const { return vocab_total > 0 ? vocab_total : vocab; }
  // The target's column in this shard, or -1 when the target lies in another shard.
  MTP_HD int64_t local_target(int64_t y) const {
    const int64_t j = y - vocab_start;
    return j >= 0 && j < vocab ? j : -1;
  }
};

// z = c * tanh(x / c): applied to each logit (after the bias) when softcap is on.
template <class T, class A>
MTP_HD T softcap_forward(T x, A cap, A inv_cap) {
  return T(cap) * Math<T>::tanh(x * T(inv_cap));
}

// dz/dx = 1 - (z / c)^2, from the capped logit z.
template <class T, class A>
MTP_HD T softcap_derivative(T z, A inv_cap) {
  T u = z * T(inv_cap);
  return T(A(1)) - u * u;
}

// Loss of a row from its statistics (pass A). max_z, sum_exp = sum_j exp(z_j - max_z),
// sum_z = sum_j z_j (used by label smoothing only), z_target = z_y. Vocab-parallel, these are
// the statistics combined over the shards (mtp_ext/vocab_parallel.py does the same sums).
template <class A>
struct RowLoss {
  A loss;
  A lse;
};

template <class A>
MTP_HD RowLoss<A> row_loss(A max_z, A sum_exp, A sum_z, A z_target, const LossOptions& o) {
  const A eps = A(o.label_smoothing);
  const A lam = A(o.z_loss);
  const A lse = max_z + Math<A>::log(sum_exp);
  A loss = (A(1) - eps) * (lse - z_target) + lam * lse * lse;
  if (eps != A(0)) loss += eps * (lse - sum_z / A(o.total_vocab()));
  return {loss, lse};
}

// The gradient of a row is G_j = f_j * (exp(z_j - lse) * a - b) - [j == y] * f_y * t, where
// f_j = dz/dx (1 without softcap) and s is the row scale (docs/design.md, "Row scale"):
//   a = s (1 + 2 lam lse),  b = s eps / V,  t = s (1 - eps).
template <class A>
struct GradCoef {
  A lse;
  A a;
  A b;
  A t;
};

template <class A>
MTP_HD GradCoef<A> grad_coef(A lse, A scale, const LossOptions& o) {
  const A eps = A(o.label_smoothing);
  const A lam = A(o.z_loss);
  return {lse, scale * (A(1) + A(2) * lam * lse), scale * eps / A(o.total_vocab()),
          scale * (A(1) - eps)};
}

// A row's running max starts at the lowest finite value, not -inf: a -inf logit (a masked
// token) then adds exp(-inf - max) = 0 even before the first finite one.
template <class A>
MTP_HD A row_max_start() {
  return Math<A>::lowest();
}

// Merges the sum of exponentials of a block into a row's running (max, sum):
// sum_exp = sum_j exp(z_j - max) over the blocks seen so far. NaN in a block makes both NaN.
template <class A>
MTP_HD void merge_block_max(A& max_z, A& sum_exp, A block_max) {
  if (block_max > max_z || block_max != block_max) {
    sum_exp *= Math<A>::exp(max_z - block_max);
    max_z = block_max;
  }
}

// G_j without the target term, from the (capped) logit z.
template <class T, class A>
MTP_HD T grad_from_logit(T z, const GradCoef<A>& k) {
  return Math<T>::exp(z - T(k.lse)) * T(k.a) - T(k.b);
}

// The target term, subtracted from G_y.
template <class A>
MTP_HD A grad_target_term(const GradCoef<A>& k, A f_target) {
  return k.t * f_target;
}

}  // namespace mtp
