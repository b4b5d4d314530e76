#include "gemm_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

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

// How many times each 16-bit GEMM path ran (gemm16_info): tests check which one.
std::array<std::atomic<int64_t>, 3> g_calls{};  // MKL mixed dW, ATen dW slabs, fp32 products

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kSlabBytes = int64_t(4) << 20;  // each temporary of the slab paths, at least

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

// Whether this CPU has dot-product instructions for t (bf16 or fp16). Without them a 16-bit GEMM
// is emulated: on an AMD EPYC with AVX2 only (2 threads, c = 512, D = 2048, V = 4096) ATen's bf16
// products ran at 0.3-21 GFLOP/s by layout, fp16 at 0.3-27, fp32 at 134-165.
bool has_16bit_dot(at::ScalarType t) {
  return t == at::kBFloat16 ? has_avx512_bf16() || has_amx_bf16()
                            : has_avx512_fp16() || has_amx_fp16();
}

// Whether the products of 16-bit operands run in fp32 (the operands converted slab by slab): by
// default where the CPU lacks the type's dot products; the cpu_gemm16 switch (native | fp32;
// MTP_EXT_CPU_GEMM16) forces one (the tests run both).
bool products_in_fp32(const at::Tensor& a) {
  const auto t = a.scalar_type();
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const int forced = switch_value(Switch::kCpuGemm16);  // 0 auto, 1 native, 2 fp32
  const bool yes = forced ? forced == 2 : !has_16bit_dot(t);
  if (yes) g_calls[2].fetch_add(1, std::memory_order_relaxed);
  return yes;
}

// The fp32 path: vocabulary slabs of s rows, s the larger of kMinSlabRows and what keeps each fp32
// temporary (a slab of W, of the logits or gradient, of dW) within kSlabBytes. The slab's rows
// are the logits' and dW's GEMM dimension: on the AVX2 EPYC above (2 threads, fp32, interleaved
// in one process), with c = 4096 chunk rows and D = 2048, slabs of 256 rows (4 MiB) ran the
// logits at 176 GFLOP/s and dW at 166, slabs of 1024 rows at 186 and 181 (dX: 188 and 187);
// c = 4096, D = 896: 168/160 against 176/174; c = 1024, D = 2048: 168/155 against 178/170;
// c = 512, D = 2048 (4 MiB: 512 rows): 170/163 against 167/174 with 2048 rows.
constexpr int64_t kMinSlabRows = 1024;

class Fp32Slabs {
 public:
  Fp32Slabs(int64_t c, int64_t D, int64_t V, Fp32Buffers& buffers)
      : V_(V),
        s_(std::min(V, std::max<int64_t>(kMinSlabRows,
                                         kSlabBytes / (4 * std::max<int64_t>({1, c, D}))))),
        a_(buffers.get(0, s_ * std::max(c, D))),
        b_(buffers.get(1, s_ * std::max(c, D))) {}
  // f(v0, len) for each slab [v0, v0 + len) of the V vocabulary rows, in order
  template <class F>
  void each(F&& f) const {
    for (int64_t v0 = 0; v0 < V_; v0 += s_) f(v0, std::min(s_, V_ - v0));
  }
  // src (any dtype, at most s * max(c, D) elements) in fp32, contiguous, in temporary a or b
  at::Tensor a(const at::Tensor& src) { return into(a_, src); }
  at::Tensor b(const at::Tensor& src) { return into(b_, src); }
  at::Tensor b_empty(int64_t rows, int64_t cols) {
    return b_.narrow(0, 0, rows * cols).view({rows, cols});
  }

 private:
  static at::Tensor into(const at::Tensor& buf, const at::Tensor& src) {
    at::Tensor t = buf.narrow(0, 0, src.numel()).view(src.sizes());
    t.copy_(src);
    return t;
  }
  int64_t V_, s_;
  at::Tensor a_, b_;
};

// x in fp32, in buffer 2
at::Tensor as_fp32(const at::Tensor& x, Fp32Buffers& buf) {
  at::Tensor t = buf.get(2, x.numel()).view(x.sizes());
  t.copy_(x);
  return t;
}

// Each product below is one profiler scope (mtp_ext::*_fp32, with the operands' shapes), as one
// aten::mm is on the native path: the tests count them.

// z[c, V] = x w^T with fp32 products, rounded once into z's dtype
void logits_fp32(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z,
                 Fp32Buffers& buf) {
  RECORD_FUNCTION("mtp_ext::logits_fp32", std::vector<c10::IValue>({x, w}));
  const int64_t c = x.size(0), D = x.size(1), V = w.size(0);
  Fp32Slabs slabs(c, D, V, buf);
  const at::Tensor x32 = as_fp32(x, buf);
  slabs.each([&](int64_t v0, int64_t len) {
    at::Tensor zl = slabs.b_empty(c, len);
    at::mm_out(zl, x32, slabs.a(w.narrow(0, v0, len)).t());
    z.narrow(1, v0, len).copy_(zl);
  });
}

// dx[c, D] = g w accumulated over the slabs in fp32, rounded once into dx's dtype
void grad_input_fp32(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx,
                     Fp32Buffers& buf) {
  RECORD_FUNCTION("mtp_ext::grad_input_fp32", std::vector<c10::IValue>({g, w}));
  const int64_t c = g.size(0), V = g.size(1), D = w.size(1);
  Fp32Slabs slabs(c, D, V, buf);
  at::Tensor acc = buf.get(3, c * D).view({c, D});
  slabs.each([&](int64_t v0, int64_t len) {
    const at::Tensor gl = slabs.a(g.narrow(1, v0, len)), wl = slabs.b(w.narrow(0, v0, len));
    if (v0 == 0) {
      at::mm_out(acc, gl, wl);
    } else {
      acc.addmm_(gl, wl);
    }
  });
  const_cast<at::Tensor&>(dx).copy_(acc);
}

// dw[V, D] (+)= g^T x: added into an fp32 accumulator, or written into a 16-bit dw (rounded once)
void grad_weight_fp32(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                      bool accumulate, Fp32Buffers& buf) {
  RECORD_FUNCTION("mtp_ext::grad_weight_fp32", std::vector<c10::IValue>({g, x}));
  const int64_t c = g.size(0), V = g.size(1), D = x.size(1);
  Fp32Slabs slabs(c, D, V, buf);
  const at::Tensor x32 = as_fp32(x, buf);
  slabs.each([&](int64_t v0, int64_t len) {
    const at::Tensor gl = slabs.a(g.narrow(1, v0, len));
    at::Tensor out = dw.narrow(0, v0, len);
    if (accumulate) {
      out.addmm_(gl.t(), x32);
    } else {
      at::Tensor p = slabs.b_empty(len, D);
      at::mm_out(p, gl.t(), x32);
      out.copy_(p);
    }
  });
}

}  // namespace

at::Tensor Fp32Buffers::get(int i, int64_t numel) {
  at::Tensor& t = t_.at(i);
  if (!t.defined() || t.numel() < numel) {
    t = at::Tensor();  // the old one freed first
    t = at::empty({numel}, at::kFloat);
  }
  return t.narrow(0, 0, numel);
}

void gemm_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z,
                 Fp32Buffers& buffers) {
  if (products_in_fp32(x)) {
    logits_fp32(x, w, z, buffers);
  } else if (z.stride(1) == 1) {
    at::mm_out(const_cast<at::Tensor&>(z), x, w.t());
  } else {  // vocabulary-major (float32/float64): z^T = w x^T
    at::Tensor zt = z.t();
    at::mm_out(zt, w, x.t());
  }
}

void gemm_grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx,
                     Fp32Buffers& buffers) {
  if (products_in_fp32(g)) {
    grad_input_fp32(g, w, dx, buffers);
  } else {
    at::mm_out(const_cast<at::Tensor&>(dx), g, w);
  }
}

void gemm_grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw_acc,
                      Fp32Buffers& buffers) {
  const auto t = g.scalar_type();
  if (t == at::kFloat || t == at::kDouble) {
    const_cast<at::Tensor&>(dw_acc).addmm_(g.t(), x);
    return;
  }
  if (products_in_fp32(g)) {
    grad_weight_fp32(g, x, dw_acc, /*accumulate=*/true, buffers);
    return;
  }
  const int64_t c = g.size(0), V = g.size(1), D = x.size(1);
  if (MixedGemm f = mixed_gemm(t)) {
    g_calls[0].fetch_add(1, std::memory_order_relaxed);
    const bool vocab_major = g.stride(1) != 1 || c == 1;  // g^T row-major [V, c]
    f(kRowMajor, vocab_major ? kNoTrans : kTrans, kNoTrans, as_int(V), as_int(D), as_int(c), 1.f,
      u16(g), as_int(vocab_major ? std::max<int64_t>(g.stride(1), c) : g.stride(0)), u16(x),
      as_int(x.stride(0)), 1.f, dw_acc.data_ptr<float>(), as_int(dw_acc.stride(0)));
    return;
  }
  // Fallback: 16-bit GEMMs per vocabulary slab, each slab's product rounded to 16 bits once
  // before it is added to the fp32 accumulator.
  g_calls[1].fetch_add(1, std::memory_order_relaxed);
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

void gemm_grad_weight_out(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw,
                          Fp32Buffers& buffers) {
  if (products_in_fp32(g)) {
    grad_weight_fp32(g, x, dw, /*accumulate=*/false, buffers);
  } else {
    at::mm_out(const_cast<at::Tensor&>(dw), g.t(), x);
  }
}

std::vector<int64_t> gemm16_info() {
  return {g_calls[0].load(),
          g_calls[1].load(),
          g_calls[2].load(),
          cblas_gemm_bf16bf16f32 != nullptr,
          has_amx_bf16(),
          has_16bit_dot(at::kBFloat16),
          has_16bit_dot(at::kHalf)};
}

}  // namespace mtp::cpu
