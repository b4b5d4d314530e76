// CPU GEMMs of the chunked loss, through ATen (MKL, oneDNN with AMX for 16-bit types). 16-bit
// operands on a CPU without the type's dot-product instructions are multiplied in fp32, converted
// in vocabulary slabs. Otherwise the weight gradient of 16-bit inputs accumulates in fp32 across
// chunks through MKL's mixed-precision GEMM (16-bit inputs, fp32 output added to the accumulator)
// when the loaded libtorch exports it, and through an ATen fallback in vocabulary slabs when not.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <vector>

namespace mtp::cpu {

// The fp32 temporaries of the products of 16-bit operands in fp32, held for one op call and
// reused by its chunks and products. Allocated per product instead, their churn fragmented
// glibc's heap (its mmap threshold rises after the first free): the peak resident set of a
// bf16 step grew with the number of chunks (n = 4 against n = 1 at N = 2048, D = 256,
// V = 32768: 3.5-9 MiB more, 0.3 MiB with these buffers or a fixed MALLOC_MMAP_THRESHOLD_).
class Fp32Buffers {
 public:
  // buffer i (0 .. 3) as a flat fp32 tensor of numel elements, grown when it is too small
  at::Tensor get(int i, int64_t numel);

 private:
  std::array<at::Tensor, 4> t_;
};

// z[c, V] = x[c, D] w[V, D]^T, in the input dtype (z row-major or vocabulary-major)
void gemm_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z,
                Fp32Buffers& buffers);
// dx[c, D] = g[c, V] w[V, D]
void gemm_grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx,
                    Fp32Buffers& buffers);
// dw_acc[V, D] (fp32/fp64) += g[c, V]^T x[c, D]
void gemm_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw_acc,
                     Fp32Buffers& buffers);
// dw[V, D] (16-bit) = g[c, V]^T x[c, D]
void gemm_grad_weight_out(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                         Fp32Buffers& buffers);
// The 16-bit GEMMs since the library loaded: {calls of MKL's mixed dW GEMM, calls of the ATen dW
// slabs, products run in fp32; 1 if libtorch exports MKL's mixed GEMM, 1 if the CPU has AMX-BF16,
// 1 if it has bf16 dot products (AVX512-BF16 or AMX-BF16), 1 if fp16 (AVX512-FP16 or AMX-FP16)}.
std::vector<int64_t> gemm16_info();

}  // namespace mtp::cpu
