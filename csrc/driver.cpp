#include "driver.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace mtp {

namespace {

constexpr int64_t kWorkspaceBudgetBytes = int64_t(64) << 20;

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Everything one pass over the rows needs. Tensors that a pass does not use are undefined.
struct Pass {
  at::Tensor x;        // [R, D] hidden rows of all heads, contiguous
  at::Tensor w;        // [V, D] or [n, V, D], contiguous
  at::Tensor bias;     // [V] or [n, V], acc dtype
  at::Tensor targets;  // [R]
  at::Tensor scales;   // [R] acc dtype: gradients wanted
  at::Tensor lse_in;   // [R]: backward recompute
  at::Tensor loss, lse, correct;  // [R] forward outputs
  at::Tensor stats, argmax;       // [R, 4], [R]: statistics mode
  at::Tensor dx;                  // [R, D] input dtype
  at::Tensor dw_acc, db_acc;      // acc dtype, shaped as weight / bias
  // 16-bit per-head weights: dw_acc is one head's [V, D] accumulator, reused head by head and
  // cast into dw_out[head] when the head's rows are done (the chunks never cross heads), so
  // the fp32 accumulator is the size of one head's weight, not of all of them.
  at::Tensor dw_out;
  int64_t rows_per_head = 0;      // N
  int64_t chunk_rows = 0;
  LossOptions opt;
};

// Folded gradient: the row kernel leaves E_j = exp(z_j - ref) and per row (alpha, b, t) such
// that G_j = alpha E_j - b - [j == y] t (RowChunk::fold), and the GEMMs take E:
//   dX_c = alpha (E W) - b sum_j W_j - t W_y
//   dW  += E^T (alpha X_c) - scatter_y(t X_c) - 1 u^T,  u = sum over all rows of b X
//   db  += E^T alpha - sum b - scatter_y(t)
// The same GEMMs as with G, and no second sweep over the chunk.
struct FoldedGradient {
  at::Tensor buf;             // [C, 3] acc dtype: the row kernel's (alpha, b, t)
  at::Tensor alpha, b, t, y;  // [c, 1] x 3 and [c] of the current chunk
  bool smoothing = false;     // b != 0
  at::Tensor u;               // [D] or [n, D]: sum of b X per weight
  at::Tensor w_sum;           // sum_j W_j of the weight of head w_sum_head
  int64_t w_sum_head = -1;

  FoldedGradient(const Pass& p, int64_t chunk_rows, at::ScalarType acc)
      : buf(at::empty({chunk_rows, 3}, p.x.options().dtype(acc))),
        smoothing(p.opt.label_smoothing != 0) {
    if (!smoothing || !p.dw_acc.defined()) return;
    const auto opts = p.x.options().dtype(acc);
    const int64_t D = p.x.size(1);
    u = p.w.dim() == 2 ? at::zeros({D}, opts) : at::zeros({p.w.size(0), D}, opts);
  }
  // Gives the row kernel this chunk's coefficients to fill.
  void start_chunk(RowChunkTensors& rc, int64_t vocab) {
    rc.fold = buf.narrow(0, 0, rc.targets.size(0));
    alpha = rc.fold.select(1, 0).unsqueeze(1);
    b = rc.fold.select(1, 1).unsqueeze(1);
    t = rc.fold.select(1, 2).unsqueeze(1);
    y = rc.targets.clamp(0, vocab - 1);  // t = 0 where the target is ignored
  }
  // dx holds E W.
  void input(at::Tensor dx, const at::Tensor& w, int64_t w_head) {
    dx.mul_(alpha);
    dx.addcmul_(t, w.index_select(0, y), -1);
    if (!smoothing) return;
    if (w_sum_head != w_head) {
      w_sum = w.sum(0, false, dx.scalar_type());
      w_sum_head = w_head;
    }
    dx.addcmul_(b, w_sum.unsqueeze(0), -1);
  }
  void weight(const DeviceKernels& dev, const at::Tensor& e, const at::Tensor& x, at::Tensor dw,
              int64_t w_head) {
    dev.grad_weight(e, x * alpha, dw);
    dw.index_add_(0, y, x * t, -1);
    if (u.defined()) (u.dim() == 1 ? u : u.select(0, w_head)).add_((x * b).sum(0));
  }
  void bias(const at::Tensor& e, at::Tensor db) {
    db.add_(at::mv(e.t(), alpha.squeeze(1)));
    db.sub_(b.sum());
    db.index_add_(0, y, t.squeeze(1), -1);
  }
  void finish(at::Tensor dw_acc) {
    if (u.defined()) dw_acc.sub_(u.unsqueeze(-2));
  }
};

void run_chunks(const DeviceKernels& dev, const Pass& p) {
  const int64_t R = p.x.size(0);
  if (R == 0) return;
  const int64_t V = p.opt.vocab;
  const int64_t N = p.rows_per_head;
  const bool shared = p.w.dim() == 2;
  // A chunk's rows share one head's weight and bias: with anything per head (weight or bias),
  // chunks stop at head boundaries.
  const bool per_head = !shared || (p.bias.defined() && p.bias.dim() == 2);
  const auto acc = acc_type_of(p.x.scalar_type());
  // The workspace holds the logits in the input dtype (fp32 for fp32 inputs; for 16-bit inputs
  // the GEMM rounds them to 16 bits, as PyTorch does, and all arithmetic after it is fp32), and
  // pass B writes the gradient over them.
  const auto store = p.x.scalar_type();
  const int64_t C =
      rows_per_chunk(p.chunk_rows, V, at::elementSize(store), R, dev.chunk_row_multiple());
  at::Tensor ws = at::empty({C * V}, p.x.options());
  const bool grad = p.scales.defined();
  const bool vocab_major = dev.vocab_major(store, C);
  std::optional<FoldedGradient> folded;
  if (grad && vocab_major && !p.lse_in.defined() && p.opt.softcap == 0 && p.opt.vocab_total == 0) {
    folded.emplace(p, C, acc);
  }
  int64_t acc_head = -1;  // the head whose gradient dw_acc holds (with dw_out)
  auto flush_head = [&] {
    if (p.dw_out.defined() && acc_head >= 0) p.dw_out.select(0, acc_head).copy_(p.dw_acc);
  };
  for (int64_t start = 0, end = 0; start < R; start = end) {
    const int64_t head = start / N;
    end = std::min(R, start + C);
    if (per_head) end = std::min(end, (head + 1) * N);
    const int64_t c = end - start;
    const at::Tensor w = shared ? p.w : p.w.select(0, head);
    const at::Tensor x = p.x.narrow(0, start, c);
    RowChunkTensors rc;
    rc.z = vocab_major ? ws.narrow(0, 0, c * V).view({V, c}).t()
                       : ws.narrow(0, 0, c * V).view({c, V});
    rc.vocab_major = vocab_major;
    dev.logits(x, w, rc.z);
    auto rows = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, start, c) : t; };
    if (p.bias.defined()) rc.bias = p.bias.dim() == 1 ? p.bias : p.bias.select(0, head);
    rc.targets = rows(p.targets);
    rc.scales = rows(p.scales);
    rc.lse_in = rows(p.lse_in);
    rc.loss = rows(p.loss);
    rc.lse = rows(p.lse);
    rc.correct = rows(p.correct);
    rc.stats = rows(p.stats);
    rc.argmax = rows(p.argmax);
    if (folded) folded->start_chunk(rc, V);
    rc.opt = p.opt;
    rc.row_offset = start;
    rc.write_grad = grad;
    dev.rows(rc);
    if (!grad) continue;
    const at::Tensor& g = rc.z;  // now the gradient, or E when folded
    const int64_t w_head = shared ? 0 : head;
    if (p.dx.defined()) {
      at::Tensor dx = p.dx.narrow(0, start, c);
      dev.grad_input(g, w, dx);
      if (folded) folded->input(dx, w, w_head);
    }
    at::Tensor dw;
    if (p.dw_out.defined()) {
      if (head != acc_head) {
        flush_head();
        p.dw_acc.zero_();
        acc_head = head;
      }
      dw = p.dw_acc;
    } else if (p.dw_acc.defined()) {
      dw = shared ? p.dw_acc : p.dw_acc.select(0, head);
    }
    if (dw.defined()) {
      if (folded) {
        folded->weight(dev, g, x, dw, w_head);
      } else {
        dev.grad_weight(g, x, dw);
      }
    }
    if (p.db_acc.defined()) {
      at::Tensor db = p.db_acc.dim() == 1 ? p.db_acc : p.db_acc.select(0, head);
      if (folded) {
        folded->bias(g, db);
      } else {
        db.add_(g.sum(0, /*keepdim=*/false, acc));
      }
    }
  }
  flush_head();
  if (folded) folded->finish(p.dw_acc);
}

// Every tensor of an op on hidden's device (the Python API checks this too; a direct op call
// with, say, CPU targets and CUDA hidden would hand host pointers to the device).
void check_device(const char* name, const at::Tensor& t, const at::Tensor& hidden) {
  TORCH_CHECK(!t.defined() || t.device() == hidden.device(), "mtp_ext: ", name,
              " is on ", t.device(), " but hidden is on ", hidden.device());
}

// Fills the inputs and gradient outputs shared by forward and backward.
Pass make_pass(const at::Tensor& hidden, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
               int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
               int64_t chunk_rows, std::array<bool, 3> grad_mask, bool want_grad,
               int64_t vocab_start = 0, int64_t vocab_total = 0) {
  TORCH_CHECK(hidden.dim() == 3, "mtp_ext: hidden must be [n, N, D], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 || weight.dim() == 3, "mtp_ext: weight must be [V, D] or [n, V, D]");
  check_device("weight", weight, hidden);
  check_device("bias", bias.has_value() ? *bias : at::Tensor(), hidden);
  check_device("targets", targets, hidden);
  const int64_t n = hidden.size(0), N = hidden.size(1), D = hidden.size(2);
  const auto acc = acc_type_of(hidden.scalar_type());
  Pass p;
  p.x = hidden.contiguous().view({n * N, D});
  p.w = weight.contiguous();
  p.targets = targets.contiguous().view({n * N});
  if (bias.has_value() && bias->defined()) p.bias = bias->to(acc).contiguous();
  p.rows_per_head = N;
  p.chunk_rows = chunk_rows;
  p.opt.vocab = weight.size(-2);
  p.opt.ignore_index = ignore_index;
  p.opt.label_smoothing = label_smoothing;
  p.opt.z_loss = z_loss;
  p.opt.softcap = softcap;
  TORCH_CHECK(vocab_total == 0 || (vocab_start >= 0 && vocab_start + p.opt.vocab <= vocab_total),
              "mtp_ext: vocabulary shard [", vocab_start, ", ", vocab_start + p.opt.vocab,
              ") is not inside [0, ", vocab_total, ")");
  p.opt.vocab_start = vocab_start;
  p.opt.vocab_total = vocab_total;
  if (want_grad) {
    if (grad_mask[0]) p.dx = at::empty_like(p.x);
    if (grad_mask[1] && weight.dim() == 3 && weight.scalar_type() != acc) {
      p.dw_acc = at::empty({weight.size(1), weight.size(2)}, weight.options().dtype(acc));
      p.dw_out = N > 0 ? at::empty(weight.sizes(), weight.options()) : at::zeros_like(weight);
    } else if (grad_mask[1]) {
      p.dw_acc = at::zeros(weight.sizes(), weight.options().dtype(acc));
    }
    if (grad_mask[2] && p.bias.defined()) p.db_acc = at::zeros_like(p.bias);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gradients_out(const Pass& p, const at::Tensor& hidden,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias) {
  auto empty = [&] { return at::empty({0}, hidden.options()); };  // distinct: outputs never alias
  at::Tensor dh = p.dx.defined() ? p.dx.view(hidden.sizes()) : empty();
  at::Tensor dw = p.dw_out.defined()   ? p.dw_out
                 : p.dw_acc.defined() ? p.dw_acc.to(weight.scalar_type())
                                      : empty();
  at::Tensor db = p.db_acc.defined() ? p.db_acc.to(bias->scalar_type()) : empty();
  return {dh, dw, db};
}

}  // namespace

int64_t rows_per_chunk(int64_t chunk_rows, int64_t vocab, int64_t elem_bytes, int64_t total_rows,
                       int64_t multiple) {
  int64_t c = chunk_rows;
  if (c <= 0) {
    c = kWorkspaceBudgetBytes / std::max<int64_t>(1, vocab * elem_bytes);
    if (multiple > 1 && c >= multiple) c -= c % multiple;
  }
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(1, total_rows)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward(
    const DeviceKernels& dev, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& head_weights, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, int64_t reduction, int64_t chunk_rows, std::array<bool, 3> grad_mask) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "mtp_ext: reduction code ", reduction);
  const auto red = static_cast<Reduction>(reduction);
  const bool want_grad =
      red != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  Pass p = make_pass(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap,
                     chunk_rows, grad_mask, want_grad);
  const int64_t n = hidden.size(0), N = hidden.size(1);
  const auto acc = acc_type_of(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);
  dev.check_targets(p.targets, p.opt.vocab, ignore_index);

  check_device("head_weights", head_weights, hidden);
  const at::Tensor valid = p.targets.view({n, N}) != ignore_index;
  const at::Tensor counts = valid.sum(1);  // [n] int64
  const at::Tensor hw = head_weights.to(acc_opts).view({n, 1});
  if (want_grad) {
    at::Tensor per_head = red == Reduction::Mean ? hw / counts.clamp_min(1).view({n, 1}).to(acc) : hw;
    p.scales = (per_head * valid).view({n * N});
  }
  p.loss = at::empty({n * N}, acc_opts);
  p.lse = at::empty({n * N}, acc_opts);
  p.correct = at::empty({n * N}, acc_opts);
  run_chunks(dev, p);
  dev.finish();

  const at::Tensor loss_rows = p.loss.view({n, N});
  const at::Tensor loss_sum = loss_rows.sum(1, false, at::kDouble);
  const at::Tensor stats =
      at::stack({loss_sum, p.correct.view({n, N}).sum(1, false, at::kDouble), counts.to(at::kDouble)}, 1);
  at::Tensor loss;
  if (red == Reduction::None) {
    loss = loss_rows;
  } else {
    const at::Tensor hwd = head_weights.to(at::kDouble);
    at::Tensor per_head = red == Reduction::Mean
                              ? at::where(counts > 0, hwd * loss_sum / counts.clamp_min(1), 0.0)
                              : hwd * loss_sum;
    loss = per_head.sum().to(acc);
  }
  auto [dh, dw, db] = gradients_out(p, hidden, weight, bias);
  return {loss, p.lse.view({n, N}), stats, dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const DeviceKernels& dev, const at::Tensor& grad_rows, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, int64_t chunk_rows, std::array<bool, 3> grad_mask, int64_t vocab_start,
    int64_t vocab_total) {
  Pass p = make_pass(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap,
                     chunk_rows, grad_mask, /*want_grad=*/true, vocab_start, vocab_total);
  check_device("grad_rows", grad_rows, hidden);
  check_device("lse", lse, hidden);
  dev.check_targets(p.targets, p.opt.total_vocab(), ignore_index);
  const auto acc = acc_type_of(hidden.scalar_type());
  const int64_t R = p.x.size(0);
  p.scales = grad_rows.to(acc).contiguous().view({R});
  p.lse_in = lse.to(acc).contiguous().view({R});
  run_chunks(dev, p);
  dev.finish();
  return gradients_out(p, hidden, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> fused_stats(
    const DeviceKernels& dev, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, int64_t ignore_index,
    double softcap, int64_t vocab_start, int64_t vocab_total, int64_t chunk_rows) {
  TORCH_CHECK(vocab_total > 0, "mtp_ext: vocab_total must be > 0, got ", vocab_total);
  Pass p = make_pass(hidden, weight, bias, targets, ignore_index, /*label_smoothing=*/0,
                     /*z_loss=*/0, softcap, chunk_rows, {false, false, false},
                     /*want_grad=*/false, vocab_start, vocab_total);
  const int64_t n = hidden.size(0), N = hidden.size(1);
  dev.check_targets(p.targets, vocab_total, ignore_index);
  p.stats = at::empty({n * N, 4}, hidden.options().dtype(acc_type_of(hidden.scalar_type())));
  p.argmax = at::empty({n * N}, hidden.options().dtype(at::kLong));
  run_chunks(dev, p);
  dev.finish();
  return {p.stats.view({n, N, 4}), p.argmax.view({n, N})};
}

}  // namespace mtp
