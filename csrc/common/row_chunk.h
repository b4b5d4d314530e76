// What a row kernel (pass A, then pass B) is given for one chunk of rows. No torch header: the
// CPU kernel and the CUDA launchers take the same struct of raw pointers.
#pragma once

#include <cstdint>

#include "ce_math.h"

namespace mtp {

// acc_t: the type of the logits workspace and of all arithmetic (float, or double for float64
// inputs). out_t: the type the gradient is written in (the input dtype); g may alias z.
template <class acc_t, class out_t>
struct RowChunk {
  int64_t rows = 0;
  int64_t ld_z = 0;             // row stride of z, in acc_t elements
  int64_t ld_g = 0;             // row stride of g, in out_t elements
  acc_t* z = nullptr;           // [rows, V]: logits X W^T (bias not yet added)
  out_t* g = nullptr;           // [rows, V]: gradient out; null = pass A only
  const acc_t* bias = nullptr;  // [V] or null
  const int64_t* targets = nullptr;
  const acc_t* scales = nullptr;  // row scale s_t (design.md); with g
  const acc_t* lse_in = nullptr;  // given lse (backward recompute): pass A is skipped
  acc_t* loss = nullptr;          // per-row loss out (forward)
  acc_t* lse = nullptr;           // per-row lse out (forward)
  acc_t* correct = nullptr;       // per-row 1 if argmax == target (forward)
  LossOptions opt;
};

}  // namespace mtp
