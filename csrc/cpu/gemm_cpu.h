// CPU GEMMs of the chunked loss, through ATen (MKL, oneDNN with AMX for 16-bit types), except the
// weight gradient of 16-bit inputs: it accumulates in fp32 across chunks through MKL's
// mixed-precision GEMM (16-bit inputs, fp32 output added to the accumulator) when the loaded
// libtorch exports it, and through an ATen fallback in vocabulary slabs when not.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace mtp::cpu {

// z[c, V] = x[c, D] w[V, D]^T, in the input dtype (z row-major or vocabulary-major)
void gemm_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z);
// dx[c, D] = g[c, V] w[V, D]
void gemm_grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx);
// dw_acc[V, D] (fp32/fp64) += g[c, V]^T x[c, D]
void gemm_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw_acc);
// The 16-bit weight-gradient GEMM: {calls of MKL's mixed GEMM, calls of the ATen slabs since the
// library loaded, 1 if libtorch exports MKL's mixed GEMM, 1 if the CPU has AMX-BF16}.
std::vector<int64_t> dw16_gemm_info();

}  // namespace mtp::cpu
