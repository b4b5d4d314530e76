#include "folded_gradient.h"

#include <ATen/ATen.h>

namespace mtp::cpu {
namespace {

// The row kernel leaves E_j = exp(z_j - ref) and per row (alpha, b, t) such that
// G_j = alpha E_j - b - [j == y] t (RowChunk::fold), and the GEMMs take E:
//   dX_c = alpha (E W) - b sum_j W_j - t W_y
//   dW  += E^T (alpha X_c) - scatter_y(t X_c) - 1 u^T,  u = sum over all rows of b X
//   db  += E^T alpha - sum b - scatter_y(t)
// The same GEMMs as with G, and no second sweep over the chunk.
class FoldedGradient final : public GradientFold {
 public:
  explicit FoldedGradient(const FoldRequest& r)
      : buf_(at::empty({r.chunk_rows, 3}, r.x.options())),  // float32/float64: x is acc dtype
        smoothing_(r.opt.label_smoothing != 0) {
    if (!smoothing_ || !r.weight_grad) return;
    const int64_t D = r.x.size(1);
    u_ = r.w.dim() == 2 ? at::zeros({D}, r.x.options()) : at::zeros({r.w.size(0), D}, r.x.options());
  }
  void start_chunk(RowChunkTensors& rc, int64_t vocab) override {
    rc.fold = buf_.narrow(0, 0, rc.targets.size(0));
    alpha_ = rc.fold.select(1, 0).unsqueeze(1);
    b_ = rc.fold.select(1, 1).unsqueeze(1);
    t_ = rc.fold.select(1, 2).unsqueeze(1);
    y_ = rc.targets.clamp(0, vocab - 1);  // t = 0 where the target is ignored
  }
  void input(at::Tensor dx, const at::Tensor& w, int64_t w_head) override {  // dx holds E W
    dx.mul_(alpha_);
    dx.addcmul_(t_, w.index_select(0, y_), -1);
    if (!smoothing_) return;
    if (w_sum_head_ != w_head) {
      w_sum_ = w.sum(0, false, dx.scalar_type());
      w_sum_head_ = w_head;
    }
    dx.addcmul_(b_, w_sum_.unsqueeze(0), -1);
  }
  void weight(const DeviceKernels& dev, const at::Tensor& e, const at::Tensor& x, at::Tensor dw,
              int64_t w_head) override {
    dev.grad_weight(e, x * alpha_, dw);
    dw.index_add_(0, y_, x * t_, -1);
    if (u_.defined()) (u_.dim() == 1 ? u_ : u_.select(0, w_head)).add_((x * b_).sum(0));
  }
  void bias(const at::Tensor& e, at::Tensor db) override {
    db.add_(at::mv(e.t(), alpha_.squeeze(1)));
    db.sub_(b_.sum());
    db.index_add_(0, y_, t_.squeeze(1), -1);
  }
  void finish(at::Tensor dw_acc) override {
    if (u_.defined()) dw_acc.sub_(u_.unsqueeze(-2));
  }

 private:
  at::Tensor buf_;                // [C, 3] acc dtype: the row kernel's (alpha, b, t)
  at::Tensor alpha_, b_, t_, y_;  // [c, 1] x 3 and [c] of the current chunk
  bool smoothing_ = false;        // b != 0
  at::Tensor u_;                  // [D] or [n, D]: sum of b X per weight
  at::Tensor w_sum_;              // sum_j W_j of the weight of head w_sum_head_
  int64_t w_sum_head_ = -1;
};

}  // namespace

std::unique_ptr<GradientFold> folded_gradient(const FoldRequest& r) {
  // 16-bit logits are not folded: E W would be rounded to 16 bits before t W_y is taken from it,
  // and at a confident row the two nearly cancel.
  const auto t = r.x.scalar_type();
  if (!r.forward || r.opt.softcap != 0 || r.opt.vocab_total != 0 ||
      (t != at::kFloat && t != at::kDouble)) {
    return nullptr;
  }
  return std::make_unique<FoldedGradient>(r);
}

}  // namespace mtp::cpu
