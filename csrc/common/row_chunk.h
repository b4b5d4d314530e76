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
  // Logit j of row r is z[r * ld_z + j * col_z]: rows contiguous (col_z = 1) on CUDA,
  // vocabulary-major (ld_z = 1) on the CPU.
  int64_t ld_z = 0;
  int64_t col_z = 1;
  store_t* z = nullptr;         // [rows, V]: logits X W^T in; the gradient out with write_grad
  bool write_grad = false;
  const acc_t* bias = nullptr;  // [V] or null
  const int64_t* targets = nullptr;
  const acc_t* scales = nullptr;  // row scale s_t (design.md), with write_grad
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
  // (driver.cpp). Ignored rows get E = 0 and zero coefficients.
  acc_t* fold = nullptr;  // [rows, 3]
  LossOptions opt;
};

}  // namespace mtp
