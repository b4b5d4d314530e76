#include "driver.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <memory>

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
  // 16-bit shared weight whose rows all fit one chunk: dw_out is its gradient, one GEMM written
  // in the input dtype as PyTorch writes it (no fp32 accumulator to zero, add into and cast).
  bool dw_direct = false;
  int64_t rows_per_head = 0;      // N
  int64_t chunk_rows = 0;         // rows per chunk (rows_per_chunk)
  LossOptions opt;
};

// The workspace budget: 64 MiB, or with a weight gradient as many rows as the dW product
// needs to run at its GEMM's rate, kDwChunkRows, within half of one head's [V, D] accumulation
// (fp32 for 16-bit inputs: the accumulator; else the gradient itself). Each chunk's dW product
// reads and writes that whole accumulation, and its rows are the product's inner dimension:
// with 261 rows (bf16 at V = 128256 in 64 MiB) the accumulation's memory traffic, not the
// GEMM, set the time (docs/design.md, "The chunked algorithm").
constexpr int64_t kDwChunkRows = 2048;

int64_t workspace_budget(int64_t V, int64_t D, at::ScalarType store, at::ScalarType acc,
                         bool weight_grad) {
  if (!weight_grad) return kWorkspaceBudgetBytes;
  const int64_t half_acc = V * D * int64_t(c10::elementSize(acc)) / 2;
  const int64_t rows = kDwChunkRows * V * int64_t(c10::elementSize(store));
  return std::max(kWorkspaceBudgetBytes, std::min(half_acc, rows));
}

// A chunk's rows share one head's weight and bias: with anything per head (weight or bias),
// chunks stop at head boundaries.
bool chunks_stop_at_heads(const Pass& p) {
  return p.w.dim() == 3 || (p.bias.defined() && p.bias.dim() == 2);
}

void run_chunks(const DeviceKernels& dev, const Pass& p) {
  const int64_t R = p.x.size(0);
  if (R == 0) return;
  const int64_t V = p.opt.vocab;
  const int64_t N = p.rows_per_head;
  const bool shared = p.w.dim() == 2;
  const bool per_head = chunks_stop_at_heads(p);
  // The workspace holds the logits in the input dtype (fp32 for fp32 inputs; for 16-bit inputs
  // the GEMM rounds them to 16 bits, as PyTorch does, and all arithmetic after it is fp32), and
  // pass B writes the gradient over them.
  const auto store = p.x.scalar_type();
  const int64_t C = p.chunk_rows;
  at::Tensor ws = at::empty({C * V}, p.x.options());
  const bool grad = p.scales.defined();
  const bool weight_grad = p.dw_acc.defined() || p.dw_out.defined();
  const int64_t work =
      grad ? (p.dx.defined() ? 1 : 0) | (weight_grad ? 2 : 0) | (p.lse_in.defined() ? 4 : 0) : 0;
  const ChunkShape shape{store, C, p.x.size(1), V, work};
  std::unique_ptr<GradientFold> fold;  // used by the vocabulary-major chunks
  if (grad) {
    FoldRequest req{p.x, p.w, p.opt, C, /*forward=*/!p.lse_in.defined(),
                    /*weight_grad=*/p.dw_acc.defined()};
    fold = dev.gradient_fold(req);
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
    const bool vocab_major = dev.vocab_major(shape);
    GradientFold* folded = vocab_major ? fold.get() : nullptr;
    const auto t0 = std::chrono::steady_clock::now();
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
    auto timed = [&] {
      const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
      dev.chunk_time(shape, vocab_major, c, dt.count());
    };
    if (!grad) {
      timed();
      continue;
    }
    const at::Tensor& g = rc.z;  // now the gradient, or E when folded
    const int64_t w_head = shared ? 0 : head;
    if (p.dx.defined()) {
      at::Tensor dx = p.dx.narrow(0, start, c);
      dev.grad_input(g, w, dx);
      if (folded) folded->input(dx, w, w_head);
    }
    at::Tensor dw;
    if (p.dw_direct) {
      dev.grad_weight_out(g, x, p.dw_out);
    } else if (p.dw_out.defined()) {
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
        db.add_(g.sum(0, /*keepdim=*/false, db.scalar_type()));
      }
    }
    timed();
  }
  flush_head();
  if (fold) fold->finish(p.dw_acc);
}

// Every tensor of an op on hidden's device (the Python API checks this too; a direct op call
// with, say, CPU targets and CUDA hidden would hand host pointers to the device).
void check_device(const char* name, const at::Tensor& t, const at::Tensor& hidden) {
  TORCH_CHECK(!t.defined() || t.device() == hidden.device(), "mtp_ext: ", name,
              " is on ", t.device(), " but hidden is on ", hidden.device());
}

// Fills the inputs and gradient outputs shared by forward and backward.
Pass make_pass(const DeviceKernels& dev, const at::Tensor& hidden, const at::Tensor& weight,
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
  p.chunk_rows = rows_per_chunk(chunk_rows, weight.size(-2), hidden.element_size(), n * N,
                                dev.chunk_row_multiple(),
                                workspace_budget(weight.size(-2), D, hidden.scalar_type(), acc,
                                                 want_grad && grad_mask[1]));
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
    const bool shared16 = grad_mask[1] && weight.dim() == 2 && weight.scalar_type() != acc;
    const bool may_be_one = n * N > 0 && (n == 1 || !chunks_stop_at_heads(p));
    // A 16-bit shared weight, chunk size not given: one chunk of every row when its logits take
    // no more memory than the fp32 dW accumulator and the workspace they replace. dW is then
    // one GEMM; in chunks, each chunk's product is added into the [V, D] fp32 accumulator,
    // which at a large vocabulary costs more memory traffic than the GEMM's own.
    const int64_t V = p.opt.vocab;
    if (shared16 && may_be_one && chunk_rows <= 0 &&
        n * N * V * hidden.element_size() <= kWorkspaceBudgetBytes + V * D * c10::elementSize(acc))
      p.chunk_rows = n * N;
    const bool one_chunk = may_be_one && n * N <= p.chunk_rows;
    if (shared16 && one_chunk) {
      p.dw_out = at::empty(weight.sizes(), weight.options());
      p.dw_direct = true;
    } else if (grad_mask[1] && weight.dim() == 3 && weight.scalar_type() != acc) {
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

void DeviceKernels::grad_weight_out(const at::Tensor& g, const at::Tensor& x,
                                    const at::Tensor& dw) const {
  at::Tensor out = dw;
  at::mm_out(out, g.t(), x);
}

int64_t rows_per_chunk(int64_t chunk_rows, int64_t vocab, int64_t elem_bytes, int64_t total_rows,
                       int64_t multiple, int64_t budget_bytes) {
  int64_t c = chunk_rows;
  if (c <= 0) {
    c = budget_bytes / std::max<int64_t>(1, vocab * elem_bytes);
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
  Pass p = make_pass(dev, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss,
                     softcap, chunk_rows, grad_mask, want_grad);
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
  Pass p = make_pass(dev, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss,
                     softcap, chunk_rows, grad_mask, /*want_grad=*/true, vocab_start, vocab_total);
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
  Pass p = make_pass(dev, hidden, weight, bias, targets, ignore_index, /*label_smoothing=*/0,
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
