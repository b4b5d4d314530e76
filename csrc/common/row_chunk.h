// What a row kernel (pass A, then pass B) is given for one chunk of rows. No torch header: the
// CPU kernel and the CUDA launchers take the same struct of raw pointers.
#pragma once

#include <cstdint>

#include "ce_math.h"

namespace mtp {

// acc_t: the type of all arithmetic (float, or double for float64 inputs). store_t: the type of
// the logits workspace, which is also the input dtype: pass B writes the gradient over it.
template <class acc_t, class store_t>
struct RowChunk {
  int64_t rows = 0;
  // Logit j of row r is z[r * ld_z + j * col_z]: rows contiguous (col_z = 1) on CUDA and for
  // the CPU's row-major kernel, vocabulary-major (ld_z = 1) for the CPU's strip kernel
  // (DeviceKernels::vocab_major).
  int64_t ld_z = 0;
  int64_t col_z = 1;
  store_t* z = nullptr;         // [rows, V]: logits X W^T in; the gradient out with write_grad
  bool write_grad = false;
  const acc_t* bias = nullptr;  // [V] or null
  const int64_t* targets = nullptr;
  const acc_t* scales = nullptr;  // row scale s_t (docs/design.md), with write_grad
  const acc_t* lse_in = nullptr;  // given lse (backward recompute): pass A is skipped
  acc_t* loss = nullptr;          // per-row loss out (forward)
  acc_t* lse = nullptr;           // per-row lse out (forward)
  acc_t* correct = nullptr;       // per-row 1 if argmax == target (forward)
  // Statistics mode (vocab-parallel forward): instead of loss, lse and correct, each row's
  // (max, sum of exp(z - max), sum of z, z of the target or 0 when another shard holds it) and
  // its argmax as a global vocabulary id (-1 for ignored rows).
  acc_t* stats = nullptr;     // [rows, 4]
  int64_t* argmax = nullptr;  // [rows]
  // Folded gradient (forward with write_grad, float32/float64 logits, no softcap; the CPU): pass
  // A leaves E_j = exp(z_j - ref) in z, with one reference per row, and per row
  // (alpha, b, t) such that G_j = alpha E_j - b - [j == y] t; pass B is left to the GEMMs
  // (csrc/cpu/folded_gradient.cpp). Ignored rows get E = 0 and zero coefficients.
  acc_t* fold = nullptr;  // [rows, 3]
  LossOptions opt;
};

// What every row kernel does around its own loops, written once for the CPU and CUDA kernels.

// A logit as the loss sees it: the bias of its vocabulary entry j added, then the softcap
// (cap 0 = off). The CPU kernels apply the same two steps to SIMD vectors.
template <class A>
struct LogitTransform {
  const A* bias = nullptr;  // [V] or null
  A cap = 0, inv_cap = 0;

  template <class S>
  MTP_HD explicit LogitTransform(const RowChunk<A, S>& p)
      : bias(p.bias), cap(A(p.opt.softcap)), inv_cap(p.opt.softcap > 0 ? A(1) / cap : A(0)) {}
  MTP_HD bool capped() const { return cap > A(0); }
  MTP_HD A operator()(A x, int64_t j) const {
    if (bias) x += bias[j];
    return capped() ? softcap_forward(x, cap, inv_cap) : x;
  }
  // dz/dx of the softcap at the capped logit z (1 without softcap)
  MTP_HD A derivative(A z) const { return capped() ? softcap_derivative(z, inv_cap) : A(1); }
};

// The outputs of row r without a loss (its target is ignore_index): zero statistics and no
// argmax, or zero loss, lse and correct (nothing in the backward, which writes none).
template <class A, class S>
MTP_HD void write_ignored_row(const RowChunk<A, S>& p, int64_t r) {
  if (p.stats) {
    for (int i = 0; i < 4; ++i) p.stats[4 * r + i] = A(0);
    p.argmax[r] = -1;
  } else if (!p.lse_in) {
    p.loss[r] = p.lse[r] = p.correct[r] = A(0);
  }
}

// The outputs of row r from its pass A statistics: max_z, sum_exp = sum_j exp(z_j - ref) (ref
// is max_z except for the CPU's folded gradient), sum_z, the target logit z_y (y: the target's
// column, -1 in another shard) and the argmax (first index of the max, -1 if none). Statistics
// mode writes them and returns 0; else the row's loss, lse and correct are written and the lse
// returned.
template <class A, class S>
MTP_HD A write_row_outputs(const RowChunk<A, S>& p, int64_t r, int64_t y, A max_z, A ref,
                           A sum_exp, A sum_z, A z_y, int64_t arg) {
  if (p.stats) {
    A* st = p.stats + 4 * r;
    st[0] = max_z;
    st[1] = sum_exp;
    st[2] = sum_z;
    st[3] = z_y;
    p.argmax[r] = arg >= 0 ? arg + p.opt.vocab_start : -1;
    return A(0);
  }
  const RowLoss<A> rl = row_loss(ref, sum_exp, sum_z, z_y, p.opt);
  p.loss[r] = rl.loss;
  p.lse[r] = rl.lse;
  p.correct[r] = y >= 0 && arg == y ? A(1) : A(0);
  return rl.lse;
}

}  // namespace mtp
