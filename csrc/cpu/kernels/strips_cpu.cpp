#include "row_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common/row_chunk.h"
#include "vec_math.h"

namespace mtp::cpu::CPU_CAPABILITY {
namespace {

// Vocabulary-major logits (the layout the CPU device chose for the chunk: layout_choice.h):
// logit j of row r is z[r + j * col_z]. The kernel works on strips of L = Vec<A>::size()
// consecutive rows, one row per SIMD lane, walking the vocabulary in blocks of kBlock entries (a
// block of one thread's rows stays in L1/L2).
template <class A>
using Vec = at::vec::Vectorized<A>;
constexpr int64_t kBlock = 32;

// `lanes` consecutive values as a Vec<A> (lanes beyond are 0), and back. 16-bit logits (S
// bfloat16 or half) are converted to and from A = float through a lane buffer.
template <class A, class S>
Vec<A> load(const S* p, int64_t lanes) {
  if constexpr (std::is_same_v<A, S>) {
    return lanes == Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, lanes);
  } else {
    alignas(64) A buf[Vec<A>::size()] = {};
    at::vec::convert(p, buf, lanes);
    return Vec<A>::loadu(buf);
  }
}

template <class A, class S>
void store(const Vec<A>& v, S* p, int64_t lanes) {
  if constexpr (std::is_same_v<A, S>) {
    if (lanes == Vec<A>::size()) {
      v.store(p);
    } else {
      v.store(p, lanes);
    }
  } else {
    alignas(64) A buf[Vec<A>::size()];
    v.store(buf);
    at::vec::convert(buf, p, lanes);
  }
}

// Bias and softcap of the lanes' logits of vocabulary entry j (LogitTransform on vectors).
template <class A>
struct Transform : LogitTransform<A> {
  using LogitTransform<A>::LogitTransform;
  using LogitTransform<A>::operator();

  Vec<A> operator()(Vec<A> v, int64_t j) const {
    if (this->bias) v = v + Vec<A>(this->bias[j]);
    return this->capped() ? softcap_forward(v, this->cap, this->inv_cap) : v;
  }
};

// One strip: rows r0 .. r0 + lanes of the chunk.
template <class A, class S>
struct Strip {
  static constexpr int64_t L = Vec<A>::size();
  S* z;          // row r0's logit 0; logit j of lane l at z[l + j * ld]
  int64_t ld;    // col_z
  int64_t lanes;
  int64_t r0;
  A valid[L];    // 1 for a row with a loss, 0 for an ignored row or a lane past the chunk
  bool all_valid;
  int64_t y[L];  // target column in this shard, -1 when none
  A z_y[L];      // transformed target logit, 0 when none

  S* at(int64_t j) const { return z + j * ld; }
  Vec<A> valid_mask() const { return Vec<A>::loadu(valid) != Vec<A>(A(0)); }
};

// Gradient coefficients of a strip's lanes as vectors (zero for invalid lanes).
template <class A>
struct LaneCoef {
  static constexpr int64_t L = Vec<A>::size();
  alignas(64) A lse[L], a[L], b[L], t[L];

  void set(int64_t l, const GradCoef<A>& k) {
    lse[l] = k.lse;
    a[l] = k.a;
    b[l] = k.b;
    t[l] = k.t;
  }
  void clear(int64_t l) { lse[l] = a[l] = b[l] = t[l] = A(0); }
};

// Per strip, what pass B needs besides the logits: the gradient coefficients as vectors, the
// target column of each lane (as A, exact below 2^24 entries; -1 for none) and its term.
template <class A>
struct LaneGrad {
  Vec<A> lse, a, b, y, t, valid;
  template <class S>
  LaneGrad(const Strip<A, S>& s, const LaneCoef<A>& k, const Transform<A>& tf) {
    constexpr int64_t L = Vec<A>::size();
    alignas(64) A y_l[L], t_l[L];
    for (int64_t l = 0; l < L; ++l) {
      const bool has = s.valid[l] && s.y[l] >= 0;
      y_l[l] = has ? A(s.y[l]) : A(-1);
      const A f_y = tf.derivative(s.z_y[l]);
      t_l[l] = has ? grad_target_term(GradCoef<A>{k.lse[l], k.a[l], k.b[l], k.t[l]}, f_y) : A(0);
    }
    lse = Vec<A>::loadu(k.lse);
    a = Vec<A>::loadu(k.a);
    b = Vec<A>::loadu(k.b);
    y = Vec<A>::loadu(y_l);
    t = Vec<A>::loadu(t_l);
    valid = s.valid_mask();
  }
  // G_j of the lanes with their target term, zero in invalid lanes.
  Vec<A> finish(Vec<A> g, int64_t j, bool all_valid) const {
    g = g - Vec<A>::blendv(Vec<A>(A(0)), t, y == Vec<A>(A(j)));
    return all_valid ? g : Vec<A>::blendv(Vec<A>(A(0)), g, valid);
  }
};

// A strip's pass A state: per lane the running max, sum of exponentials, sum of z and argmax.
template <class A>
struct RunningStats {
  static constexpr int64_t L = Vec<A>::size();
  Vec<A> m{row_max_start<A>()}, se{A(0)}, sz{A(0)};
  Vec<A> ref{row_max_start<A>()};  // folded gradient: the reference of the exponentials
  int64_t arg[L];
  RunningStats() { std::fill(arg, arg + L, int64_t(-1)); }
};

// Fills the lanes of the strip at row r0 and writes the outputs of its ignored rows.
template <class A, class S>
void init_strip(const RowChunk<A, S>& p, const Transform<A>& tf, int64_t r0, Strip<A, S>& s) {
  constexpr int64_t L = Strip<A, S>::L;
  const LossOptions& o = p.opt;
  s.z = p.z + r0 * p.ld_z;
  s.ld = p.col_z;
  s.lanes = std::min(L, p.rows - r0);
  s.r0 = r0;
  s.all_valid = s.lanes == L;
  for (int64_t l = 0; l < L; ++l) {
    const bool ok = l < s.lanes && p.targets[r0 + l] != o.ignore_index;
    s.valid[l] = ok ? A(1) : A(0);
    s.y[l] = ok ? o.local_target(p.targets[r0 + l]) : -1;
    s.z_y[l] = s.y[l] >= 0 ? tf(A(*(s.at(s.y[l]) + l)), s.y[l]) : A(0);
    s.all_valid &= ok;
    if (!ok && l < s.lanes) write_ignored_row(p, r0 + l);
  }
}

// Writes a strip's per-row outputs from its pass A statistics; fills k for pass B, or the
// folded coefficients.
template <class A, class S>
void finish_strip(const RowChunk<A, S>& p, const Strip<A, S>& s, const RunningStats<A>& st,
                  LaneCoef<A>& k) {
  constexpr int64_t L = Strip<A, S>::L;
  const LossOptions& o = p.opt;
  alignas(64) A m_l[L], se_l[L], sz_l[L], ref_l[L];
  st.m.store(m_l);
  st.se.store(se_l);
  st.sz.store(sz_l);
  st.ref.store(ref_l);
  for (int64_t l = 0; l < L; ++l) {
    k.clear(l);
    const int64_t r = s.r0 + l;
    if (p.fold && l < s.lanes) std::fill(p.fold + 3 * r, p.fold + 3 * r + 3, A(0));
    if (!s.valid[l]) continue;
    // Folded: se is relative to ref; the true max m only makes the lse nan when it is nan or inf.
    const A base = p.fold ? ref_l[l] + (m_l[l] - m_l[l]) : m_l[l];
    const A lse = write_row_outputs(p, r, s.y[l], m_l[l], base, se_l[l], sz_l[l], s.z_y[l],
                                    st.arg[l]);
    if (!p.write_grad) continue;  // (statistics mode never writes the gradient)
    const GradCoef<A> g = grad_coef(lse, p.scales[r], o);
    if (p.fold) {
      A* f = p.fold + 3 * r;
      f[0] = g.a * Math<A>::exp(ref_l[l] - lse);
      f[1] = g.b;
      f[2] = g.t;
    } else {
      k.set(l, g);
    }
  }
}

// Folded gradient: the exponentials of a row are relative to one reference, its max as far as
// it is known, raised only when a block's max exceeds it by more than kHeadroom (so stored
// values stay below e^60 and their sum below V e^60). Raising it rescales what the lane has
// stored so far: rare, as logits rarely span 60 within a row after the first block.
constexpr double kHeadroom = 60;

template <class A, class S>
void raise_reference(const Strip<A, S>& s, int64_t j0, const A* block_max, RunningStats<A>& r) {
  constexpr int64_t L = Strip<A, S>::L;
  alignas(64) A ref_l[L], se_l[L];
  r.ref.store(ref_l);
  r.se.store(se_l);
  bool raised = false;
  for (int64_t l = 0; l < s.lanes; ++l) {
    if (!(block_max[l] > ref_l[l] + A(kHeadroom))) continue;
    const A f = Math<A>::exp(ref_l[l] - block_max[l]);
    se_l[l] *= f;
    for (int64_t j = 0; j < j0; ++j) s.at(j)[l] = S(A(s.at(j)[l]) * f);
    ref_l[l] = block_max[l];
    raised = true;
  }
  if (!raised) return;
  r.ref = Vec<A>::loadu(ref_l);
  r.se = Vec<A>::loadu(se_l);
}

// Strips [first, last) of a chunk, on one thread. Each pass walks the vocabulary in blocks of
// kBlock entries; within a block it reads entry by entry the thread's rows as one contiguous
// run (strip after strip would read one cache line per page and stall on every load).
template <class A, class S>
void process_strips(const RowChunk<A, S>& p, int64_t first, int64_t last) {
  constexpr int64_t L = Vec<A>::size();
  const LossOptions& o = p.opt;
  const int64_t V = o.vocab;
  const int64_t count = last - first;
  const Transform<A> tf(p);
  std::vector<Strip<A, S>> strips(count);
  std::vector<LaneCoef<A>> coef(count);
  for (int64_t i = 0; i < count; ++i) init_strip(p, tf, (first + i) * L, strips[i]);
  // Folded gradient (forward with gradients, no softcap): pass A leaves the exponentials
  // against the rows' references and the coefficients; there is no pass B.
  const bool fold = p.fold != nullptr;
  TORCH_CHECK(!fold || (p.write_grad && !p.lse_in && !tf.capped()),
              "mtp_ext: a folded gradient needs a forward with gradients and no softcap");
  if (p.lse_in) {  // backward recompute: pass B only, from the given lse
    for (int64_t i = 0; i < count; ++i) {
      for (int64_t l = 0; l < L; ++l) {
        const int64_t r = strips[i].r0 + l;
        if (strips[i].valid[l]) {
          coef[i].set(l, grad_coef(p.lse_in[r], p.scales[r], o));
        } else {
          coef[i].clear(l);
        }
      }
    }
  } else {
    // Pass A: per lane the running max and sum of exponentials, the sum of z, and the argmax
    // (the first index of the maximum, found in the block that raised it).
    const bool want_sum = o.label_smoothing != 0 || p.stats;
    std::vector<RunningStats<A>> st(count);
    std::vector<Vec<A>> bm(count);
    std::vector<A> buf(count * kBlock * L);  // the block's transformed logits, strip by strip
    alignas(64) A bm_l[L], m_l[L];
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, V - j0);
      std::fill(bm.begin(), bm.end(), Vec<A>(row_max_start<A>()));
      for (int64_t jj = 0; jj < n; ++jj) {
        for (int64_t i = 0; i < count; ++i) {
          const Vec<A> v = tf(load<A, S>(strips[i].at(j0 + jj), strips[i].lanes), j0 + jj);
          v.store(buf.data() + (i * kBlock + jj) * L);
          bm[i] = at::vec::maximum(bm[i], v);
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        const Strip<A, S>& s = strips[i];
        RunningStats<A>& r = st[i];
        const A* b = buf.data() + i * kBlock * L;
        bm[i].store(bm_l);
        r.m.store(m_l);
        for (int64_t l = 0; l < s.lanes; ++l) {
          if (!(bm_l[l] > m_l[l])) continue;
          for (int64_t jj = 0; jj < n; ++jj) {
            if (b[jj * L + l] == bm_l[l]) {
              r.arg[l] = j0 + jj;
              break;
            }
          }
        }
        const Vec<A> m_new = at::vec::maximum(r.m, bm[i]);
        if (fold) {
          r.m = m_new;
          raise_reference(s, j0, bm_l, r);
        } else {
          r.se = r.se * Math<Vec<A>>::exp(r.m - m_new);
          r.m = m_new;
        }
        const Vec<A> ref = fold ? r.ref : r.m;
        const Vec<A> valid = s.valid_mask(), zero(A(0));
        Vec<A> bse(A(0));
        for (int64_t jj = 0; jj < n; ++jj) {
          const Vec<A> v = Vec<A>::loadu(b + jj * L);
          Vec<A> e = Math<Vec<A>>::exp(v - ref);
          if (fold && !s.all_valid) e = Vec<A>::blendv(zero, e, valid);
          if (fold) store<A, S>(e, s.at(j0 + jj), s.lanes);  // lines still in cache
          bse = bse + e;
          if (want_sum) r.sz = r.sz + v;
        }
        r.se = r.se + bse;
      }
    }
    for (int64_t i = 0; i < count; ++i) finish_strip(p, strips[i], st[i], coef[i]);
    if (!p.write_grad || fold) return;
  }
  // Pass B (softcap, or backward recompute): G_j = f_j (exp(z_j - lse) a - b) - [j == y] f_y t.
  std::vector<LaneGrad<A>> lg;
  lg.reserve(count);
  for (int64_t i = 0; i < count; ++i) lg.emplace_back(strips[i], coef[i], tf);
  const bool cap_on = tf.capped();
  for (int64_t j = 0; j < V; ++j) {
    for (int64_t i = 0; i < count; ++i) {
      const Strip<A, S>& s = strips[i];
      const LaneGrad<A>& k = lg[i];
      const Vec<A> v = tf(load<A, S>(s.at(j), s.lanes), j);
      Vec<A> g = Math<Vec<A>>::exp(v - k.lse) * k.a - k.b;
      if (cap_on) g = g * softcap_derivative(v, tf.inv_cap);
      store<A, S>(k.finish(g, j, s.all_valid), s.at(j), s.lanes);
    }
  }
}

template <class A, class S>
void strips_typed(const RowChunkTensors& c) {
  const RowChunk<A, S> p = row_chunk_of<A, S>(c);
  TORCH_CHECK(p.rows <= 1 || p.ld_z == 1, "mtp_ext: the CPU row kernel takes vocabulary-major "
              "logits (row stride 1), got row stride ", p.ld_z);
  // LaneGrad compares vocabulary indices as A: exact up to 2^24 (float32).
  TORCH_CHECK(p.opt.vocab <= (int64_t(1) << std::numeric_limits<A>::digits),
              "mtp_ext: a vocabulary of ", p.opt.vocab, " entries is too large for ",
              sizeof(A) == 4 ? "float32 arithmetic" : "float64", " on the CPU");
  constexpr int64_t L = Vec<A>::size();
  const int64_t strips = (p.rows + L - 1) / L;
  // Each thread takes a contiguous range of strips (a few rows make one strip and one thread:
  // the GEMMs dominate there).
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    process_strips(p, begin, end);
  });
}

}  // namespace

void strips(const RowChunkTensors& c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.z.scalar_type(), "mtp_ext_strips", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    strips_typed<acc_t, scalar_t>(c);
  });
}

}  // namespace mtp::cpu::CPU_CAPABILITY
