// The CPU implementations of the mtp_ext ops: the shared driver with CPU GEMMs and row kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../driver.h"
#include "../switches.h"
#include "cpu_capability.h"
#include "folded_gradient.h"
#include "gemm_cpu.h"
#include "layout_choice.h"

namespace mtp::cpu {
namespace {

class CpuKernels final : public DeviceKernels {
 public:
  // Measured per chunk shape (layout_choice.h). Chunks too small to time: float32/float64
  // vocabulary-major from 256 rows (measured faster at 512 rows, V = 32768, and at 256,
  // V = 65536; slower at 130, V = 128256: 9 strips for 2 threads), 16-bit row-major (the
  // vocabulary-major kernel converts lane by lane and adds a second sweep: the 16-bit
  // gradient is not folded). The cpu_layout switch (vocab | row; MTP_EXT_CPU_LAYOUT) forces one
  // layout (the tests run both whatever their chunk size).
  bool vocab_major(const ChunkShape& s) const override {
    const int forced = switch_value(Switch::kCpuLayout);  // 0 auto, 1 vocab, 2 row
    if (forced) return forced == 1;
    const bool wide = s.dtype == at::kFloat || s.dtype == at::kDouble;
    return choose_vocab_major(s, wide && s.chunk_rows >= 256);
  }
  void chunk_time(const ChunkShape& s, bool vocab_major, int64_t c, double seconds) const override {
    if (!switch_value(Switch::kCpuLayout)) record_chunk_time(s, vocab_major, c, seconds);
  }
  void check_targets(const at::Tensor& targets, int64_t vocab, int64_t ignore) const override {
    const int64_t* t = targets.data_ptr<int64_t>();
    const int64_t R = targets.numel();
    for (int64_t i = 0; i < R; ++i) {
      const int64_t y = t[i];
      if (y != ignore && (y < 0 || y >= vocab)) {
        TORCH_CHECK_INDEX(false, "mtp_ext: target ", y, " at flattened row ", i,
                          " is outside [0, ", vocab, ") and is not ignore_index (", ignore, ")");
      }
    }
  }
  void logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z) const override {
    gemm_logits(x, w, z, fp32_);
  }
  void rows(const RowChunkTensors& chunk) const override {
    const RowKernels& k = row_kernels();
    (chunk.vocab_major ? k.strips : k.rows)(chunk);
  }
  void grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx) const override {
    gemm_grad_input(g, w, dx, fp32_);
  }
  void grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw) const override {
    gemm_grad_weight(g, x, dw, fp32_);
  }
  void grad_weight_out(const at::Tensor& g, const at::Tensor& x,
                       const at::Tensor& dw) const override {
    gemm_grad_weight_out(g, x, dw, fp32_);
  }
  // The vocabulary-major row kernel (kernels/strips_cpu.cpp) folds pass B into the GEMMs in the forward
  // with gradients (folded_gradient.h).
  std::unique_ptr<GradientFold> gradient_fold(const FoldRequest& request) const override {
    return folded_gradient(request);
  }

 private:
  mutable Fp32Buffers fp32_;  // one op call's (a CpuKernels per call)
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ce_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& head_weights, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, int64_t reduction, int64_t chunk_rows,
    std::array<bool, 3> grad_mask) {
  return fused_forward(CpuKernels(), hidden, weight, bias, targets, head_weights, ignore_index,
                       label_smoothing, z_loss, softcap, reduction, chunk_rows, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    int64_t chunk_rows, std::array<bool, 3> grad_mask, int64_t vocab_start, int64_t vocab_total) {
  return fused_backward(CpuKernels(), grad_rows, hidden, weight, bias, targets, lse, ignore_index,
                        label_smoothing, z_loss, softcap, chunk_rows, grad_mask, vocab_start,
                        vocab_total);
}

std::tuple<at::Tensor, at::Tensor> fused_ce_stats_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double softcap, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_rows) {
  return fused_stats(CpuKernels(), hidden, weight, bias, targets, ignore_index, softcap, vocab_start,
                     vocab_total, chunk_rows);
}

}  // namespace

// No tensor argument, so no device to dispatch on: each is the library's one catch-all kernel.
TORCH_LIBRARY_FRAGMENT(mtp_ext, m) {
  m.def("_cpu_gemm16_info() -> int[]", &gemm16_info);
  m.def("_cpu_capability() -> str", &cpu_capability);
  m.def("_cpu_capabilities() -> str[]", &cpu_capabilities);
  m.def("_cpu_layout_trials() -> float[]", [] {
    std::vector<double> flat;
    for (const auto& row : layout_trials()) flat.insert(flat.end(), row.begin(), row.end());
    return flat;
  });
}

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("fused_ce", &fused_ce_cpu);
  m.impl("fused_ce_backward", &fused_ce_backward_cpu);
  m.impl("fused_ce_stats", &fused_ce_stats_cpu);
}

}  // namespace mtp::cpu
