#include "rows_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "../common/row_chunk.h"

namespace mtp {

// The vector types of this CPU build, for the shared maths of ce_math.h.
template <class S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(const V& x) { return x.exp_u20(); }
  static V log(const V& x) { return x.log(); }
  static V tanh(const V& x) { return x.tanh(); }
};

namespace cpu {
namespace {

constexpr int64_t kBlock = 256;  // elements of a gradient row converted at once

// Applies bias and softcap to a row in place.
template <class A>
void transform_row(A* z, const A* bias, int64_t V, A cap) {
  using Vec = at::vec::Vectorized<A>;
  const A inv = cap > 0 ? A(1) / cap : A(0);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    Vec v = Vec::loadu(z + j);
    if (bias) v = v + Vec::loadu(bias + j);
    if (cap > 0) v = softcap_forward(v, cap, inv);
    v.store(z + j);
  }
  for (; j < V; ++j) {
    A v = z[j];
    if (bias) v += bias[j];
    if (cap > 0) v = softcap_forward(v, cap, inv);
    z[j] = v;
  }
}

template <class A>
struct Stats {
  A max, sum_exp, sum_z;
  int64_t argmax;
};

// Pass A: max, argmax (first), sum of z, sum of exp(z - max). With store_exp, z_j is replaced
// by exp(z_j - max) for pass B.
template <class A>
Stats<A> row_stats(A* z, int64_t V, bool want_sum_z, bool store_exp) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t L = Vec::size();
  const int64_t Vv = V - V % L;
  Vec vmax(-std::numeric_limits<A>::infinity());
  Vec vsum(A(0));
  for (int64_t j = 0; j < Vv; j += L) {
    Vec v = Vec::loadu(z + j);
    vmax = at::vec::maximum(vmax, v);
    if (want_sum_z) vsum = vsum + v;
  }
  A m = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  A sz = want_sum_z ? at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vsum) : A(0);
  for (int64_t j = Vv; j < V; ++j) {
    m = (z[j] > m || z[j] != z[j]) ? z[j] : m;
    sz += z[j];
  }
  int64_t arg = -1;
  const Vec bm(m);
  for (int64_t j = 0; j < Vv && arg < 0; j += L) {
    const int hit = ~(Vec::loadu(z + j) == bm).zero_mask() & ((1 << L) - 1);
    if (hit) arg = j + __builtin_ctz(hit);
  }
  for (int64_t j = Vv; j < V && arg < 0; ++j) {
    if (z[j] == m) arg = j;
  }
  Vec vs(A(0));
  for (int64_t j = 0; j < Vv; j += L) {
    Vec e = Math<Vec>::exp(Vec::loadu(z + j) - bm);
    if (store_exp) e.store(z + j);
    vs = vs + e;
  }
  A s = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vs);
  for (int64_t j = Vv; j < V; ++j) {
    A e = Math<A>::exp(z[j] - m);
    if (store_exp) z[j] = e;
    s += e;
  }
  return {m, s, sz, arg};
}

// Pass B: G_j over the row, written in the input dtype over the start of the row (g may alias
// z: block k of g is written after block k of z was read, and never ahead of it).
template <class A, class O>
void row_gradient(A* z, O* g, int64_t V, int64_t y, const GradCoef<A>& k, A cap, bool from_exp,
                  A inv_sum) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t L = Vec::size();
  const A inv_cap = cap > 0 ? A(1) / cap : A(0);
  const A f_y = cap > 0 ? softcap_derivative(z[y], inv_cap) : A(1);
  const A target_term = grad_target_term(k, f_y);
  const A a_over_sum = k.a * inv_sum;
  alignas(64) A buf[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t b = std::min(kBlock, V - j0);
    const int64_t bv = b - b % L;
    const A* zb = z + j0;
    for (int64_t j = 0; j < bv; j += L) {
      Vec v = Vec::loadu(zb + j);
      Vec out;
      if (from_exp) {
        out = grad_from_exp(v, a_over_sum, k);
      } else {
        out = grad_from_logit(v, k);
        if (cap > 0) out = out * softcap_derivative(v, inv_cap);
      }
      out.store(buf + j);
    }
    for (int64_t j = bv; j < b; ++j) {
      A v = zb[j];
      A out = from_exp ? grad_from_exp(v, a_over_sum, k) : grad_from_logit(v, k);
      if (!from_exp && cap > 0) out *= softcap_derivative(v, inv_cap);
      buf[j] = out;
    }
    if (y >= j0 && y < j0 + b) buf[y - j0] -= target_term;
    at::vec::convert(buf, g + j0, b);
  }
}

template <class A, class O>
void process_row(const RowChunk<A, O>& p, int64_t r) {
  const LossOptions& o = p.opt;
  const int64_t V = o.vocab;
  A* z = p.z + r * p.ld_z;
  O* g = p.g ? p.g + r * p.ld_g : nullptr;
  const int64_t y = p.targets[r];
  if (y == o.ignore_index) {
    if (!p.lse_in) p.loss[r] = p.lse[r] = p.correct[r] = A(0);
    if (g) std::fill(g, g + V, O(0));
    return;
  }
  const A cap = A(o.softcap);
  if (p.bias || cap > 0) transform_row(z, p.bias, V, cap);
  if (p.lse_in) {
    const GradCoef<A> k = grad_coef(p.lse_in[r], p.scales[r], o);
    row_gradient(z, g, V, y, k, cap, /*from_exp=*/false, A(1));
    return;
  }
  const bool store_exp = g != nullptr && !(cap > 0);
  const A z_y = z[y];
  const Stats<A> st = row_stats(z, V, o.label_smoothing != 0, store_exp);
  const RowLoss<A> rl = row_loss(st.max, st.sum_exp, st.sum_z, z_y, o);
  p.loss[r] = rl.loss;
  p.lse[r] = rl.lse;
  p.correct[r] = st.argmax == y ? A(1) : A(0);
  if (!g) return;
  const GradCoef<A> k = grad_coef(rl.lse, p.scales[r], o);
  row_gradient(z, g, V, y, k, cap, store_exp, A(1) / st.sum_exp);
}

template <class T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <class A, class O>
void rows_typed(const RowChunkTensors& c) {
  RowChunk<A, O> p;
  p.rows = c.z.size(0);
  p.ld_z = c.z.stride(0);
  p.z = c.z.data_ptr<A>();
  if (c.g.defined()) {
    p.g = c.g.data_ptr<O>();
    p.ld_g = c.g.stride(0);
  }
  p.bias = ptr_or_null<A>(c.bias);
  p.targets = c.targets.data_ptr<int64_t>();
  p.scales = ptr_or_null<A>(c.scales);
  p.lse_in = ptr_or_null<A>(c.lse_in);
  p.loss = ptr_or_null<A>(c.loss);
  p.lse = ptr_or_null<A>(c.lse);
  p.correct = ptr_or_null<A>(c.correct);
  p.opt = c.opt;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) process_row(p, r);
  });
}

}  // namespace

void rows(const RowChunkTensors& c) {
  const at::ScalarType out = c.g.defined() ? c.g.scalar_type() : c.z.scalar_type();
  if (c.z.scalar_type() == at::kDouble) {
    TORCH_CHECK(out == at::kDouble, "mtp_ext: float64 logits need float64 inputs");
    rows_typed<double, double>(c);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out, "mtp_ext_rows_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) rows_typed<float, scalar_t>(c);
  });
}

}  // namespace cpu
}  // namespace mtp
