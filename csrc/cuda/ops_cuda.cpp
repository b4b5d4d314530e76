// The CUDA implementations of the mtp_ext ops: the shared driver with cuBLAS GEMMs (through
// ATen, on the current stream) and the row kernels of rows_cuda.cu. The only CUDA file that
// includes torch headers; compiled in CUDA builds only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../driver.h"
#include "../switches.h"
#include "rows_cuda.h"

namespace mtp::cuda {
namespace {

template <class A, class S>
void rows_typed(const RowChunkTensors& c, unsigned long long* first_bad) {
  const RowChunk<A, S> p = row_chunk_of<A, S>(c);
  TORCH_CHECK(p.col_z == 1 || p.opt.vocab <= 1, "mtp_ext: the CUDA row kernel takes contiguous rows");
  const cudaError_t err =
      launch_rows<A, S>(p, c.row_offset, first_bad, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "mtp_ext: row kernel launch failed: ", cudaGetErrorString(err));
}

bool stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status);
  TORCH_CHECK(err == cudaSuccess, "mtp_ext: cudaStreamIsCapturing: ", cudaGetErrorString(err));
  return status != cudaStreamCaptureStatusNone;
}

// Whether this torch's out_dtype overload of addmm takes an fp32 `self` with 16-bit inputs (its
// rule for `self` differs between torch versions; some ask self in the inputs' dtype). Probed
// once per dtype on a 1 x 1 product, so that the refusal is told from any other error: the real
// products' errors (an out-of-memory one included) always propagate.
bool out_dtype_takes_fp32_self(const at::Tensor& like) {
  static std::atomic<int> verdict[2] = {-1, -1};  // [bf16, fp16]; -1: not probed yet
  std::atomic<int>& v = verdict[like.scalar_type() == at::kHalf];
  if (v.load() < 0) {
    const at::Tensor a = at::zeros({1, 1}, like.options());
    at::Tensor acc = at::zeros({1, 1}, like.options().dtype(at::kFloat));
    try {
      at::addmm_out(acc, acc, a, a, at::kFloat);
      v.store(1);
    } catch (const c10::OutOfMemoryError&) {
      throw;  // no verdict: the device is full
    } catch (const c10::Error&) {
      v.store(0);
    }
  }
  return v.load() == 1;
}

// The 16-bit weight gradient accumulated in fp32: cuBLAS through ATen's out_dtype overload of
// addmm where this torch takes an fp32 `self`, else through 16-bit slabs of at most 32 MiB added
// into the accumulator (cuBLAS still accumulates each slab in fp32; each slab is rounded once,
// as PyTorch's own dW is). The cuda_dw16 switch (MTP_EXT_CUDA_DW_SLABS=1) forces the slabs (the
// GPU check runs both).
void grad_weight_16bit(const at::Tensor& g, const at::Tensor& x, at::Tensor acc) {
  if (switch_value(Switch::kCudaDw16) == 0 && out_dtype_takes_fp32_self(g)) {
    at::addmm_out(acc, acc, g.t(), x, at::kFloat);
    return;
  }
  const int64_t V = acc.size(0), D = acc.size(1);
  const int64_t slab = std::max<int64_t>(1, (int64_t(32) << 20) / std::max<int64_t>(1, D * 2));
  for (int64_t v0 = 0; v0 < V; v0 += slab) {
    const int64_t vb = std::min(slab, V - v0);
    acc.narrow(0, v0, vb).add_(at::mm(g.narrow(1, v0, vb).t(), x));
  }
}

class CudaKernels final : public DeviceKernels {
 public:
  explicit CudaKernels(const at::Tensor& like)
      : first_bad_(at::full({1}, -1, like.options().dtype(at::kLong))) {}

  // cuBLAS tiles of 128 rows: a chunk from the budget is rounded down to a multiple of them.
  int64_t chunk_row_multiple() const override { return 128; }
  // Checked on the device by the row kernels, reported once by finish().
  void check_targets(const at::Tensor&, int64_t, int64_t) const override {}

  void logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z) const override {
    at::Tensor out = z;
    at::mm_out(out, x, w.t());
  }
  void rows(const RowChunkTensors& c) const override {
    auto* bad = reinterpret_cast<unsigned long long*>(first_bad_.data_ptr<int64_t>());
    switch (c.z.scalar_type()) {
      case at::kFloat: return rows_typed<float, float>(c, bad);
      case at::kDouble: return rows_typed<double, double>(c, bad);
      case at::kBFloat16: return rows_typed<float, __nv_bfloat16>(c, bad);
      case at::kHalf: return rows_typed<float, __half>(c, bad);
      default: TORCH_CHECK(false, "mtp_ext: unsupported dtype ", c.z.scalar_type());
    }
  }
  void grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx) const override {
    at::Tensor out = dx;
    at::mm_out(out, g, w);
  }
  void grad_weight(const at::Tensor& g, const at::Tensor& x, const at::Tensor& dw) const override {
    if (g.scalar_type() == dw.scalar_type()) {
      at::Tensor acc = dw;
      acc.addmm_(g.t(), x);
    } else {  // 16-bit inputs, fp32 accumulator
      grad_weight_16bit(g, x, dw);
    }
  }
  // The op's one host synchronisation, outside CUDA graph capture; while a graph is captured
  // (torch.compile mode="reduce-overhead", torch.cuda.graph), an asynchronous device assert.
  void finish() const override {
    if (stream_is_capturing()) {
      at::_assert_async(first_bad_.eq(-1).all(),
                        "mtp_ext: a target is outside the vocabulary and is not ignore_index");
      return;
    }
    const int64_t bad = first_bad_.item<int64_t>();
    TORCH_CHECK_INDEX(bad == -1, "mtp_ext: the target at flattened row ", bad,
                      " is outside the vocabulary and is not ignore_index");
  }

 private:
  at::Tensor first_bad_;  // int64 [1]: the first bad row, -1 (all ones, unsigned) when none
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
