#include "row_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common/row_chunk.h"
#include "vec_math.h"

namespace mtp::cpu::CPU_CAPABILITY {
namespace {

// A row is processed in blocks that live in L1: each block of the stored logits is converted to
// the arithmetic type, gets its bias and softcap, and is then reduced (pass A) or turned into
// the gradient and written back over itself (pass B). Each pass reads the row once.
constexpr int64_t kBlock = 512;

template <class A>
struct Block : LogitTransform<A> {
  using LogitTransform<A>::LogitTransform;
  using LogitTransform<A>::bias;

  // buf[0, b) = transform(z[j0, j0 + b)): LogitTransform, vectorized
  template <class S>
  void load(const S* z, int64_t j0, int64_t b, A* buf) const {
    using Vec = at::vec::Vectorized<A>;
    at::vec::convert(z + j0, buf, b);
    if (!bias && !this->capped()) return;
    int64_t j = 0;
    for (; j + Vec::size() <= b; j += Vec::size()) {
      Vec v = Vec::loadu(buf + j);
      if (bias) v = v + Vec::loadu(bias + j0 + j);
      if (this->capped()) v = softcap_forward(v, this->cap, this->inv_cap);
      v.store(buf + j);
    }
    for (; j < b; ++j) buf[j] = (*this)(buf[j], j0 + j);
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

// The block as arithmetic values: the stored logits themselves when they need no conversion
// nor transform, else buf filled by tf.load.
template <class A, class S>
A* view_block(S* z, int64_t j0, int64_t b, A* buf, const Block<A>& tf) {
  if constexpr (std::is_same_v<A, S>) {
    if (!tf.bias && !tf.capped()) return z + j0;
  }
  tf.load(z, j0, b, buf);
  return buf;
}

// z as A* when the storage is the arithmetic type (float32/float64), else null.
template <class A, class S>
A* same_type_or_null(S* z) {
  if constexpr (std::is_same_v<A, S>) {
    return z;
  } else {
    return nullptr;
  }
}

template <class A>
int64_t first_index_of(const A* v, int64_t b, A x) {
  for (int64_t j = 0; j < b; ++j) {
    if (v[j] == x) return j;
  }
  return -1;
}

// e_j = exp(v_j - m) written to out (which may be v); returns sum_j e_j.
template <class A>
A block_exp_store(const A* v, A* out, int64_t b, A m) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t bv = b - b % L;
  A se = 0;
  if (bv > 0) {
    const Vec<A> vm(m);
    Vec<A> ve(A(0));
    for (int64_t j = 0; j < bv; j += L) {
      const Vec<A> e = Math<Vec<A>>::exp(Vec<A>::loadu(v + j) - vm);
      e.store(out + j);
      ve = ve + e;
    }
    se = at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& c) { return a + c; }, ve);
  }
  for (int64_t j = bv; j < b; ++j) {
    out[j] = Math<A>::exp(v[j] - m);
    se += out[j];
  }
  return se;
}

// Pass B from the exponentials stored by pass A (float32/float64 storage, no softcap):
// e_j = exp(z_j - m_k) with m_k the running max when block k was seen, so
// G_j = e_j * exp(m_k - lse) * a - b, one multiply-add per element.
template <class A>
void row_gradient_from_exp(A* e, int64_t V, int64_t y, const GradCoef<A>& k, const A* block_max_seen) {
  constexpr int64_t L = Vec<A>::size();
  for (int64_t j0 = 0, blk = 0; j0 < V; j0 += kBlock, ++blk) {
    const int64_t b = std::min(kBlock, V - j0);
    const int64_t bv = b - b % L;
    const A c = Math<A>::exp(block_max_seen[blk] - k.lse) * k.a;
    const Vec<A> vc(c), vb(k.b);
    A* eb = e + j0;
    for (int64_t j = 0; j < bv; j += L) at::vec::fmsub(Vec<A>::loadu(eb + j), vc, vb).store(eb + j);
    for (int64_t j = bv; j < b; ++j) eb[j] = eb[j] * c - k.b;
    if (y >= j0 && y < j0 + b) eb[y - j0] -= grad_target_term(k, A(1));
  }
}

// Pass B: the gradient of the row, written over the stored logits.
template <class A, class S>
void row_gradient(S* z, int64_t V, int64_t y, A z_y, const GradCoef<A>& k, const Block<A>& tf) {
  constexpr int64_t L = Vec<A>::size();
  const bool cap = tf.capped();
  const A target_term = grad_target_term(k, tf.derivative(z_y));
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
      buf[j] = g * tf.derivative(buf[j]);
    }
    if (y >= j0 && y < j0 + b) buf[y - j0] -= target_term;
    at::vec::convert(buf, z + j0, b);
  }
}

// block_max_seen: scratch of one entry per block of the row; row_exp: scratch of V entries for
// 16-bit logits with gradients (else null).
template <class A, class S>
void process_row(const RowChunk<A, S>& p, int64_t r, A* block_max_seen, A* row_exp) {
  const LossOptions& o = p.opt;
  const int64_t V = o.vocab;
  S* z = p.z + r * p.ld_z;
  if (p.targets[r] == o.ignore_index) {
    write_ignored_row(p, r);
    if (p.write_grad) std::fill(z, z + V, S(0));
    return;
  }
  const int64_t y = o.local_target(p.targets[r]);  // -1: in another vocabulary shard
  const Block<A> tf(p);
  const A z_y = y >= 0 ? tf(A(z[y]), y) : A(0);
  if (p.lse_in) {
    row_gradient(z, V, y, z_y, grad_coef(p.lse_in[r], p.scales[r], o), tf);
    return;
  }
  // Pass A: running max and sum of exponentials over the blocks, sum of z, argmax (the first
  // index of the maximum, found in the block that raised it). Without softcap the exponentials
  // are kept for pass B: in place over float32/float64 logits, in the thread's row_exp (the
  // row in the arithmetic type, which stays in cache) over 16-bit ones; pass B is then one
  // multiply-add per element instead of a conversion and an exponential.
  constexpr bool kSameType = std::is_same_v<A, S>;
  const bool store_exp = p.write_grad && !tf.capped() && (kSameType || row_exp);
  A* const e = kSameType ? same_type_or_null<A>(z) : row_exp;
  alignas(64) A buf[kBlock];
  A m = row_max_start<A>(), se = 0, sz = 0;
  int64_t arg = -1;
  const bool want_sum = o.label_smoothing != 0 || p.stats;
  for (int64_t j0 = 0, blk = 0; j0 < V; j0 += kBlock, ++blk) {
    const int64_t b = std::min(kBlock, V - j0);
    // the row streams in from memory: ask for the block after next while this one is reduced
    for (int64_t j = j0 + 2 * kBlock; j < std::min(V, j0 + 3 * kBlock); j += 64 / sizeof(S)) {
      __builtin_prefetch(z + j);
    }
    A* v = view_block(z, j0, b, buf, tf);
    const A bm = block_max(v, b);
    if (bm > m) arg = j0 + first_index_of(v, b, bm);
    merge_block_max(m, se, bm);
    if (store_exp) {
      if (want_sum) sz += block_sums(v, b, m, true).second;
      se += block_exp_store(v, e + j0, b, m);
      block_max_seen[blk] = m;
    } else {
      const auto [bse, bsz] = block_sums(v, b, m, want_sum);
      se += bse;
      sz += bsz;
    }
  }
  const A lse = write_row_outputs(p, r, y, m, m, se, sz, z_y, arg);
  if (!p.write_grad) return;  // (statistics mode never writes the gradient)
  const GradCoef<A> k = grad_coef(lse, p.scales[r], o);
  if (store_exp) {
    row_gradient_from_exp(e, V, y, k, block_max_seen);
    if constexpr (!kSameType) at::vec::convert(e, z, V);
  } else {
    row_gradient(z, V, y, z_y, k, tf);
  }
}

template <class A, class S>
void rows_typed(const RowChunkTensors& c) {
  const RowChunk<A, S> p = row_chunk_of<A, S>(c);
  TORCH_CHECK(p.col_z == 1 || p.opt.vocab <= 1, "mtp_ext: row kernel given vocabulary-major logits");
  const int64_t blocks = (p.opt.vocab + kBlock - 1) / kBlock;
  // process_row keeps 16-bit rows' exponentials here (without softcap; see there)
  const bool exp_scratch =
      !std::is_same_v<A, S> && p.write_grad && !p.lse_in && !(p.opt.softcap > 0);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> block_max_seen(blocks);
    std::vector<A> row_exp(exp_scratch ? p.opt.vocab : 0);
    for (int64_t r = begin; r < end; ++r) {
      process_row(p, r, block_max_seen.data(), exp_scratch ? row_exp.data() : nullptr);
    }
  });
}

}  // namespace

void rows(const RowChunkTensors& c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.z.scalar_type(), "mtp_ext_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rows_typed<acc_t, scalar_t>(c);
  });
}

}  // namespace mtp::cpu::CPU_CAPABILITY
