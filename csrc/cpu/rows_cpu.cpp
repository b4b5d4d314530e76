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

// A row is processed in blocks that live in L1: each block of the stored logits is converted to
// the arithmetic type, gets its bias and softcap, and is then reduced (pass A) or turned into
// the gradient and written back over itself (pass B). Each pass reads the row once.
constexpr int64_t kBlock = 512;

template <class A>
struct Block {
  const A* bias;  // [V] or null
  A cap, inv_cap;  // cap 0 = off

  // buf[0, b) = transform(z[j0, j0 + b))
  template <class S>
  void load(const S* z, int64_t j0, int64_t b, A* buf) const {
    using Vec = at::vec::Vectorized<A>;
    at::vec::convert(z + j0, buf, b);
    if (!bias && !(cap > 0)) return;
    int64_t j = 0;
    for (; j + Vec::size() <= b; j += Vec::size()) {
      Vec v = Vec::loadu(buf + j);
      if (bias) v = v + Vec::loadu(bias + j0 + j);
      if (cap > 0) v = softcap_forward(v, cap, inv_cap);
      v.store(buf + j);
    }
    for (; j < b; ++j) buf[j] = scalar(buf[j], j0 + j);
  }
  A scalar(A x, int64_t j) const {
    if (bias) x += bias[j];
    return cap > 0 ? softcap_forward(x, cap, inv_cap) : x;
  }
};

template <class A>
using Vec = at::vec::Vectorized<A>;

template <class A>
A block_max(const A* buf, int64_t b) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t bv = b - b % L;
  A m = -std::numeric_limits<A>::infinity();
  if (bv > 0) {
    Vec<A> vm(m);
    for (int64_t j = 0; j < bv; j += L) vm = at::vec::maximum(vm, Vec<A>::loadu(buf + j));
    m = at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& c) { return at::vec::maximum(a, c); }, vm);
  }
  for (int64_t j = bv; j < b; ++j) m = (buf[j] > m || buf[j] != buf[j]) ? buf[j] : m;
  return m;
}

// (sum_j exp(buf_j - m), sum_j buf_j)
template <class A>
std::pair<A, A> block_sums(const A* buf, int64_t b, A m, bool want_sum) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t bv = b - b % L;
  A se = 0, sz = 0;
  if (bv > 0) {
    const Vec<A> vm(m);
    Vec<A> ve(A(0)), vz(A(0));
    for (int64_t j = 0; j < bv; j += L) {
      const Vec<A> v = Vec<A>::loadu(buf + j);
      ve = ve + Math<Vec<A>>::exp(v - vm);
      if (want_sum) vz = vz + v;
    }
    auto add = [](Vec<A>& a, Vec<A>& c) { return a + c; };
    se = at::vec::vec_reduce_all<A>(add, ve);
    if (want_sum) sz = at::vec::vec_reduce_all<A>(add, vz);
  }
  for (int64_t j = bv; j < b; ++j) {
    se += Math<A>::exp(buf[j] - m);
    sz += buf[j];
  }
  return {se, sz};
}

// Pass B: the gradient of the row, written over the stored logits.
template <class A, class S>
void row_gradient(S* z, int64_t V, int64_t y, A z_y, const GradCoef<A>& k, const Block<A>& tf) {
  constexpr int64_t L = Vec<A>::size();
  const bool cap = tf.cap > 0;
  const A f_y = cap ? softcap_derivative(z_y, tf.inv_cap) : A(1);
  const A target_term = grad_target_term(k, f_y);
  alignas(64) A buf[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t b = std::min(kBlock, V - j0);
    const int64_t bv = b - b % L;
    tf.load(z, j0, b, buf);
    for (int64_t j = 0; j < bv; j += L) {
      const Vec<A> v = Vec<A>::loadu(buf + j);
      Vec<A> g = grad_from_logit(v, k);
      if (cap) g = g * softcap_derivative(v, tf.inv_cap);
      g.store(buf + j);
    }
    for (int64_t j = bv; j < b; ++j) {
      A g = grad_from_logit(buf[j], k);
      buf[j] = cap ? g * softcap_derivative(buf[j], tf.inv_cap) : g;
    }
    if (y >= j0 && y < j0 + b) buf[y - j0] -= target_term;
    at::vec::convert(buf, z + j0, b);
  }
}

template <class A, class S>
void process_row(const RowChunk<A, S>& p, int64_t r) {
  const LossOptions& o = p.opt;
  const int64_t V = o.vocab;
  S* z = p.z + r * p.ld_z;
  const int64_t y = p.targets[r];
  if (y == o.ignore_index) {
    if (!p.lse_in) p.loss[r] = p.lse[r] = p.correct[r] = A(0);
    if (p.write_grad) std::fill(z, z + V, S(0));
    return;
  }
  const A cap = A(o.softcap);
  const Block<A> tf{p.bias, cap, cap > 0 ? A(1) / cap : A(0)};
  const A z_y = tf.scalar(A(z[y]), y);
  if (p.lse_in) {
    row_gradient(z, V, y, z_y, grad_coef(p.lse_in[r], p.scales[r], o), tf);
    return;
  }
  // Pass A: running max and sum of exponentials over the blocks, sum of z, argmax.
  alignas(64) A buf[kBlock];
  A m = -std::numeric_limits<A>::infinity(), se = 0, sz = 0;
  int64_t best = 0;
  const bool want_sum = o.label_smoothing != 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t b = std::min(kBlock, V - j0);
    tf.load(z, j0, b, buf);
    const A bm = block_max(buf, b);
    if (bm > m) best = j0;
    merge_block_max(m, se, bm);
    const auto [bse, bsz] = block_sums(buf, b, m, want_sum);
    se += bse;
    sz += bsz;
  }
  // The first index of the maximum lies in the first block that reached it.
  int64_t arg = -1;
  {
    const int64_t b = std::min(kBlock, V - best);
    tf.load(z, best, b, buf);
    for (int64_t j = 0; j < b && arg < 0; ++j) {
      if (buf[j] == m) arg = best + j;
    }
  }
  const RowLoss<A> rl = row_loss(m, se, sz, z_y, o);
  p.loss[r] = rl.loss;
  p.lse[r] = rl.lse;
  p.correct[r] = arg == y ? A(1) : A(0);
  if (p.write_grad) row_gradient(z, V, y, z_y, grad_coef(rl.lse, p.scales[r], o), tf);
}

template <class T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <class A, class S>
void rows_typed(const RowChunkTensors& c) {
  RowChunk<A, S> p;
  p.rows = c.z.size(0);
  p.ld_z = c.z.stride(0);
  p.z = c.z.data_ptr<S>();
  p.write_grad = c.g.defined();
  TORCH_CHECK(!p.write_grad || c.g.data_ptr() == c.z.data_ptr(),
              "mtp_ext: the CPU row kernel writes the gradient over the logits");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.z.scalar_type(), "mtp_ext_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rows_typed<acc_t, scalar_t>(c);
  });
}

}  // namespace cpu
}  // namespace mtp
