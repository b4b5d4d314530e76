// The vector types of this CPU build (at::vec), for the shared maths of ce_math.h.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../../common/ce_math.h"

namespace mtp {

template <class S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(const V& x) { return x.exp_u20(); }
  static V log(const V& x) { return x.log(); }
  static V tanh(const V& x) { return x.tanh(); }
};

}  // namespace mtp
