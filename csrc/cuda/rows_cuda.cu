// CUDA row kernels: a row is spread over a thread block. Pass A: each thread keeps a running
// (max, sum of exp, argmax, sum of z) over its strided elements, merged across the block; pass B
// writes the gradient over the logits in place (each element by the thread that reads it).
// The maths is that of csrc/common/ce_math.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "rows_cuda.h"

namespace mtp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <class S, class A>
__device__ __forceinline__ S from_acc(A x);
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half(x); }

// 16-byte packs of S for vectorized loads and stores.
template <class S>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(S);
  S v[kN];
};

template <class A>
struct Running {
  A max, sum_exp, sum_z;
  int64_t arg;
};

template <class A>
__device__ __forceinline__ void push(Running<A>& r, A x, int64_t j) {
  r.sum_z += x;
  if (x > r.max) {
    r.sum_exp = r.sum_exp * Math<A>::exp(r.max - x) + A(1);
    r.max = x;
    r.arg = j;
  } else {
    r.sum_exp += Math<A>::exp(x - r.max);  // NaN stays NaN
  }
}

template <class A>
__device__ __forceinline__ Running<A> merge(const Running<A>& a, const Running<A>& b) {
  if (a.max != a.max || b.max != b.max) {
    const A nan = a.max != a.max ? a.max : b.max;
    return {nan, nan, a.sum_z + b.sum_z, -1};
  }
  Running<A> r;
  r.max = a.max > b.max ? a.max : b.max;
  const A sa = a.sum_exp == A(0) ? A(0) : a.sum_exp * Math<A>::exp(a.max - r.max);
  const A sb = b.sum_exp == A(0) ? A(0) : b.sum_exp * Math<A>::exp(b.max - r.max);
  r.sum_exp = sa + sb;
  r.sum_z = a.sum_z + b.sum_z;
  if (a.max == b.max) {
    r.arg = (a.arg >= 0 && (b.arg < 0 || a.arg < b.arg)) ? a.arg : b.arg;
  } else {
    r.arg = a.max > b.max ? a.arg : b.arg;
  }
  return r;
}

template <class A>
__device__ Running<A> block_merge(Running<A> r) {
  __shared__ Running<A> warp_out[kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    Running<A> o;
    o.max = __shfl_down_sync(0xffffffffu, r.max, off);
    o.sum_exp = __shfl_down_sync(0xffffffffu, r.sum_exp, off);
    o.sum_z = __shfl_down_sync(0xffffffffu, r.sum_z, off);
    o.arg = __shfl_down_sync(0xffffffffu, r.arg, off);
    r = merge(r, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_out[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) r = merge(r, warp_out[w]);
  }
  return r;  // valid in thread 0
}

// Calls f(element, j) for the row's elements j owned by this thread, in increasing j, with
// 16-byte packs when the row allows it; kWrite stores the elements back.
template <bool kVec, bool kWrite, class S, class F>
__device__ __forceinline__ void for_each(S* z, int64_t V, F&& f) {
  if constexpr (kVec) {
    constexpr int N = Pack<S>::kN;
    Pack<S>* zp = reinterpret_cast<Pack<S>*>(z);
    for (int64_t i = threadIdx.x; i < V / N; i += kThreads) {
      Pack<S> pk = zp[i];
#pragma unroll
      for (int e = 0; e < N; ++e) f(pk.v[e], i * N + e);
      if constexpr (kWrite) zp[i] = pk;
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) f(z[j], j);
  }
}

template <class A, class S, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) rows_kernel(RowChunk<A, S> p, int64_t row_offset,
                                                        unsigned long long* first_bad) {
  const int64_t r = blockIdx.x;
  const LossOptions& o = p.opt;
  const int64_t V = o.vocab;
  S* z = p.z + r * p.ld_z;
  const int64_t y_global = p.targets[r];
  const bool ignored = y_global == o.ignore_index;
  const bool bad = !ignored && (y_global < 0 || y_global >= o.total_vocab());
  // the smallest bad row wins, whatever the order the blocks run in (as the CPU reports it)
  if (bad && threadIdx.x == 0) {
    atomicMin(first_bad, static_cast<unsigned long long>(row_offset + r));
  }
  if (ignored || bad) {
    if (threadIdx.x == 0) write_ignored_row(p, r);
    if (p.write_grad) {
      for_each<kVec, true>(z, V, [](S& v, int64_t) { v = from_acc<S>(A(0)); });
    }
    return;
  }
  const LogitTransform<A> tf(p);
  __shared__ A row_lse;
  const int64_t y = o.local_target(y_global);  // -1: in another vocabulary shard
  const A z_y = y >= 0 ? tf(to_acc(z[y]), y) : A(0);
  if (p.lse_in) {
    if (threadIdx.x == 0) row_lse = p.lse_in[r];
  } else {
    Running<A> run{row_max_start<A>(), A(0), A(0), -1};
    for_each<kVec, false>(z, V, [&](S& v, int64_t j) { push(run, tf(to_acc(v), j), j); });
    run = block_merge(run);
    if (threadIdx.x == 0) {
      row_lse = write_row_outputs(p, r, y, run.max, run.max, run.sum_exp, run.sum_z, z_y, run.arg);
    }
  }
  if (!p.write_grad) return;
  __syncthreads();
  const GradCoef<A> k = grad_coef(row_lse, p.scales[r], o);
  const A target_term = grad_target_term(k, tf.derivative(z_y));
  for_each<kVec, true>(z, V, [&](S& v, int64_t j) {
    const A x = tf(to_acc(v), j);
    A g = grad_from_logit(x, k);
    if (tf.capped()) g *= tf.derivative(x);
    if (j == y) g -= target_term;
    v = from_acc<S>(g);
  });
}

}  // namespace

template <class A, class S>
cudaError_t launch_rows(const RowChunk<A, S>& p, int64_t row_offset,
                        unsigned long long* first_bad, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  constexpr int N = Pack<S>::kN;
  const bool vec = p.opt.vocab % N == 0 && (p.ld_z * int64_t(sizeof(S))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.z) % 16 == 0;
  if (vec) {
    rows_kernel<A, S, true><<<p.rows, kThreads, 0, stream>>>(p, row_offset, first_bad);
  } else {
    rows_kernel<A, S, false><<<p.rows, kThreads, 0, stream>>>(p, row_offset, first_bad);
  }
  return cudaGetLastError();
}

#define MTP_INSTANTIATE(A, S)                                                         \
  template cudaError_t launch_rows<A, S>(const RowChunk<A, S>&, int64_t, unsigned long long*, \
                                         cudaStream_t);
MTP_INSTANTIATE(float, float)
MTP_INSTANTIATE(double, double)
MTP_INSTANTIATE(float, __nv_bfloat16)
MTP_INSTANTIATE(float, __half)
#undef MTP_INSTANTIATE

}  // namespace mtp::cuda
