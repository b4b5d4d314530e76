#include "gemm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../switches.h"
#include "cpu_features.h"

// MKL's CBLAS mixed-precision GEMMs (LP64: 32-bit integers). libtorch_cpu exports them where it
// links MKL; weak references leave them null elsewhere.
extern "C" {
__attribute__((weak)) void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m,
                                                  int n, int k, float alpha, const uint16_t* a,
                                                  int lda, const uint16_t* b, int ldb, float beta,
                                                  float* c, int ldc);
__attribute__((weak)) void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n,
                                                int k, float alpha, const uint16_t* a, int lda,
                                                const uint16_t* b, int ldb, float beta, float* c,
                                                int ldc);
}

namespace mtp::cpu {
namespace {

// How many times each 16-bit weight-gradient path ran (gemm_path_calls): tests check which one.
std::array<std::atomic<int64_t>, 2> g_dw16_calls{};  // MKL mixed, ATen slabs

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kSlabBytes = int64_t(4) << 20;  // each temporary of the slab path

using MixedGemm = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);

// The 16-bit weight gradient's GEMM: MKL's mixed GEMM (16-bit inputs, accumulated into the fp32
// dW in place), or ATen's 16-bit GEMM per vocabulary slab. bf16 takes MKL's where the CPU has
// AMX, the slabs elsewhere: on an AMD EPYC with AVX512-BF16 and no AMX (2 threads, n = 4,
// N = 4096, V = 32768, forward and backward) the whole loss took 1.96x (D = 1024) and 2.09x
// (D = 512) the GEMM floor with MKL's, 1.04x and 1.05x with the slabs added through ATen's add_
// (which converts into a temporary first), 0.99x and 1.01x with add_into. fp16 takes MKL's: on the
// same CPU it was the faster of the two (0.88x against 0.99x the floor at N = 512, D = 256; both
// far slower than bf16, as fp16 GEMMs are there). The cpu_dw16 switch (mkl | slabs;
// MTP_EXT_CPU_DW16) forces one (the tests run both).
MixedGemm mixed_gemm(at::ScalarType t) {
  MixedGemm f = t == at::kBFloat16 ? cblas_gemm_bf16bf16f32
                : t == at::kHalf   ? cblas_gemm_f16f16f32
                                   : nullptr;
  const int forced = switch_value(Switch::kCpuDw16);  // 0 auto, 1 mkl, 2 slabs
  if (forced == 2) return nullptr;
  if (forced == 1) {
    TORCH_CHECK(f, "mtp_ext: cpu_dw16 mkl (MTP_EXT_CPU_DW16), but this libtorch exports no MKL "
                "mixed GEMM");
    return f;
  }
  return t == at::kHalf || has_amx_bf16() ? f : nullptr;
}

const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

int as_int(int64_t v) {
  TORCH_CHECK(v <= INT32_MAX, "mtp_ext: GEMM dimension ", v, " exceeds the 32-bit BLAS interface");
  return static_cast<int>(v);
}

// acc += p, p 16-bit [len, D] contiguous, acc fp32 rows of stride acc.stride(0): one pass over
// both (ATen's add_ of a 16-bit tensor into a float one converts into a temporary first).
void add_into(const at::Tensor& acc, const at::Tensor& p) {
  const int64_t rows = p.size(0), D = p.size(1), ld = acc.stride(0);
  float* a = acc.data_ptr<float>();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(p.scalar_type(), "mtp_ext_add_into", [&] {
    const scalar_t* q = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         float* ar = a + r * ld;
                         const scalar_t* qr = q + r * D;
                         for (int64_t j = 0; j < D; ++j) ar[j] += static_cast<float>(qr[j]);
                       }
                     });
  });
}

}  // namespace

void gemm_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z) {
  if (z.stride(1) == 1) {
    at::mm_out(const_cast<at::Tensor&>(z), x, w.t());
  } else {  // vocabulary-major (float32/float64): z^T = w x^T
    at::Tensor zt = z.t();
    at::mm_out(zt, w, x.t());
  }
}

void gemm_grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx) {
  at::mm_out(const_cast<at::Tensor&>(dx), g, w);
}

void gemm_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw_acc) {
  const auto t = g.scalar_type();
  if (t == at::kFloat || t == at::kDouble) {
    const_cast<at::Tensor&>(dw_acc).addmm_(g.t(), x);
    return;
  }
  const int64_t c = g.size(0), V = g.size(1), D = x.size(1);
  if (MixedGemm f = mixed_gemm(t)) {
    g_dw16_calls[0].fetch_add(1, std::memory_order_relaxed);
    f(kRowMajor, kTrans, kNoTrans, as_int(V), as_int(D), as_int(c), 1.f, u16(g),
      as_int(g.stride(0)), u16(x), as_int(x.stride(0)), 1.f, dw_acc.data_ptr<float>(),
      as_int(dw_acc.stride(0)));
    return;
  }
  // Fallback: 16-bit GEMMs per vocabulary slab, each slab's product rounded to 16 bits once
  // before it is added to the fp32 accumulator.
  g_dw16_calls[1].fetch_add(1, std::memory_order_relaxed);
  // A slab's product [s, D] and the contiguous copy of its transposed gradient [s, c] that the
  // GEMM may make are each at most kSlabBytes.
  const int64_t s =
      std::max<int64_t>(16, kSlabBytes / (std::max<int64_t>({1, D, c}) * x.element_size()));
  at::Tensor prod = at::empty({s, D}, x.options());
  for (int64_t v0 = 0; v0 < V; v0 += s) {
    const int64_t len = std::min(s, V - v0);
    at::Tensor p = prod.narrow(0, 0, len);
    at::mm_out(p, g.narrow(1, v0, len).t(), x);
    add_into(dw_acc.narrow(0, v0, len), p);
  }
}

std::vector<int64_t> dw16_gemm_info() {
  return {g_dw16_calls[0].load(), g_dw16_calls[1].load(), cblas_gemm_bf16bf16f32 != nullptr,
          has_amx_bf16()};
}

}  // namespace mtp::cpu
