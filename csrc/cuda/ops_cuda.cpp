// The CUDA implementations of the mtp_ext ops: the shared driver with cuBLAS GEMMs (through
// ATen, on the current stream) and the row kernels of rows_cuda.cu. The only CUDA file that
// includes torch headers; compiled in CUDA builds only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../driver.h"
#include "rows_cuda.h"

namespace mtp::cuda {
namespace {

template <class A, class S>
void rows_typed(const RowChunkTensors& c, int* bad_target) {
  const RowChunk<A, S> p = row_chunk_of<A, S>(c);
  TORCH_CHECK(p.col_z == 1 || p.opt.vocab <= 1, "mtp_ext: the CUDA row kernel takes contiguous rows");
  const cudaError_t err =
      launch_rows<A, S>(p, c.row_offset, bad_target, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "mtp_ext: row kernel launch failed: ", cudaGetErrorString(err));
}

class CudaKernels final : public DeviceKernels {
 public:
  explicit CudaKernels(const at::Tensor& like)
      : bad_target_(at::zeros({1}, like.options().dtype(at::kInt))) {}

  // Checked on the device by the row kernels, reported once by finish().
  void check_targets(const at::Tensor&, int64_t, int64_t) const override {}

  void logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z) const override {
    at::mm_out(const_cast<at::Tensor&>(z), x, w.t());
  }
  void rows(const RowChunkTensors& c) const override {
    int* bad = bad_target_.data_ptr<int>();
    switch (c.z.scalar_type()) {
      case at::kFloat: return rows_typed<float, float>(c, bad);
      case at::kDouble: return rows_typed<double, double>(c, bad);
      case at::kBFloat16: return rows_typed<float, __nv_bfloat16>(c, bad);
      case at::kHalf: return rows_typed<float, __half>(c, bad);
      default: TORCH_CHECK(false, "mtp_ext: unsupported dtype ", c.z.scalar_type());
    }
  }
  void grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx) const override {
    at::mm_out(const_cast<at::Tensor&>(dx), g, w);
  }
  void grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw) const override {
    at::Tensor& acc = const_cast<at::Tensor&>(dw);
    if (g.scalar_type() == acc.scalar_type()) {
      acc.addmm_(g.t(), x);
    } else {  // 16-bit inputs, fp32 output accumulated in place by cuBLAS
      at::addmm_out(acc, acc, g.t(), x, at::kFloat);
    }
  }
  void finish() const override {
    const int bad = bad_target_.item<int>();  // the op's one host synchronisation
    TORCH_CHECK_INDEX(bad == 0, "mtp_ext: the target at flattened row ", bad - 1,
                      " is outside the vocabulary and is not ignore_index");
  }

 private:
  at::Tensor bad_target_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ce_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& head_weights, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, int64_t reduction, int64_t chunk_rows,
    std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return fused_forward(CudaKernels(hidden), hidden, weight, bias, targets, head_weights,
                       ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_rows,
                       grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_ce_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    int64_t chunk_rows, std::array<bool, 3> grad_mask, int64_t vocab_start, int64_t vocab_total) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return fused_backward(CudaKernels(hidden), grad_rows, hidden, weight, bias, targets, lse,
                        ignore_index, label_smoothing, z_loss, softcap, chunk_rows, grad_mask, vocab_start,
                        vocab_total);
}

std::tuple<at::Tensor, at::Tensor> fused_ce_stats_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double softcap, int64_t vocab_start,
    int64_t vocab_total, int64_t chunk_rows) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return fused_stats(CudaKernels(hidden), hidden, weight, bias, targets, ignore_index, softcap, vocab_start,
                     vocab_total, chunk_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("fused_ce", &fused_ce_cuda);
  m.impl("fused_ce_backward", &fused_ce_backward_cuda);
  m.impl("fused_ce_stats", &fused_ce_stats_cuda);
}

}  // namespace mtp::cuda
