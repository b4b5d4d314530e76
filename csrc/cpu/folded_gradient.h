// The CPU's gradient fold (DeviceKernels::gradient_fold): pass B folded into the GEMMs, so that
// the forward with gradients sweeps each chunk of float32/float64 logits once (strips_cpu.cpp
// leaves the exponentials and the per-row coefficients).
#pragma once

#include "../driver.h"

namespace mtp::cpu {

// A fold for the vocabulary-major chunks of this call, or none: the forward with gradients of
// float32/float64 logits without softcap, on an unsharded vocabulary.
std::unique_ptr<GradientFold> folded_gradient(const FoldRequest& request);

}  // namespace mtp::cpu
