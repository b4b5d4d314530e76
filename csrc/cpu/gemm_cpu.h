// CPU GEMMs of the chunked loss, through ATen (MKL, oneDNN with AMX for 16-bit types). 16-bit
// operands on a CPU without the type's dot-product instructions are multiplied in fp32, converted
// in vocabulary slabs. Otherwise the weight gradient of 16-bit inputs accumulates in fp32 across
// chunks through MKL's mixed-precision GEMM (16-bit inputs, fp32 output added to the accumulator)
// when the loaded libtorch exports it, and through an ATen fallback in vocabulary slabs when not.
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
// dw[V, D] (16-bit) = g[c, V]^T x[c, D]
void gemm_grad_weight_out(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw);
// The 16-bit GEMMs since the library loaded: {calls of MKL's mixed dW GEMM, calls of the ATen dW
// slabs, products run in fp32; 1 if libtorch exports MKL's mixed GEMM, 1 if the CPU has AMX-BF16,
// 1 if it has bf16 dot products (AVX512-BF16 or AMX-BF16), 1 if fp16 (AVX512-FP16 or AMX-FP16)}.
std::vector<int64_t> gemm16_info();

}  // namespace mtp::cpu
