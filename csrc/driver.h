// The chunking driver of docs/design.md, one for every device: it walks the rows of all heads in
// chunks that fit the workspace budget and calls the device's GEMMs and row kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <memory>
#include <tuple>

#include "common/ce_math.h"
#include "common/row_chunk.h"

namespace mtp {

enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// One chunk of rows for a device's row kernel, as tensors (the device turns them into RowChunk).
struct RowChunkTensors {
  at::Tensor z;        // [c, V] input dtype: the logits, laid out as the device asks
  bool vocab_major = false;  // z^T contiguous (DeviceKernels::vocab_major)
  bool write_grad = false;  // pass B: write the gradient over z
  at::Tensor bias;     // [V] acc dtype or undefined
  at::Tensor targets;  // [c] int64
  at::Tensor scales;   // [c] acc dtype, with g
  at::Tensor lse_in;   // [c] acc dtype: given lse (backward), or undefined (forward)
  at::Tensor loss, lse, correct;  // [c] acc dtype outputs of the forward
  at::Tensor stats, argmax;       // statistics mode: [c, 4] acc dtype and [c] int64 (row_chunk.h)
  at::Tensor fold;                // folded gradient: [c, 3] acc dtype (row_chunk.h)
  int64_t row_offset = 0;         // flattened index of the chunk's first row
  LossOptions opt;
};

// Static (internal to each file): the CPU row kernels are compiled once per capability, and a
// shared copy could be one compiled for a wider CPU (scripts/check_cpu_isa.py).
template <class T>
static T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// The raw pointers of a chunk for a row kernel (A: arithmetic type, S: storage type of z).
// Both devices' kernels take this struct; undefined tensors become null pointers.
template <class A, class S>
static RowChunk<A, S> row_chunk_of(const RowChunkTensors& c) {
  RowChunk<A, S> p;
  p.rows = c.z.size(0);
  p.ld_z = c.z.stride(0);
  p.col_z = c.z.stride(1);
  p.z = ptr_or_null<S>(c.z);
  p.write_grad = c.write_grad;
  p.bias = ptr_or_null<const A>(c.bias);
  p.targets = ptr_or_null<const int64_t>(c.targets);
  p.scales = ptr_or_null<const A>(c.scales);
  p.lse_in = ptr_or_null<const A>(c.lse_in);
  p.loss = ptr_or_null<A>(c.loss);
  p.lse = ptr_or_null<A>(c.lse);
  p.correct = ptr_or_null<A>(c.correct);
  p.stats = ptr_or_null<A>(c.stats);
  p.argmax = ptr_or_null<int64_t>(c.argmax);
  p.fold = ptr_or_null<A>(c.fold);
  p.opt = c.opt;
  return p;
}

class DeviceKernels;

// What the driver tells a device when it asks for a gradient fold (DeviceKernels::gradient_fold):
// the fold serves the call's vocabulary-major chunks.
struct FoldRequest {
  const at::Tensor& x;  // [R, D] hidden rows of all heads
  const at::Tensor& w;  // [V, D] or [n, V, D]
  const LossOptions& opt;
  int64_t chunk_rows;
  bool forward;      // the forward with gradients (the backward recomputes from a given lse)
  bool weight_grad;  // dW wanted
};

// The chunks of one call, as a device's layout choice sees them (DeviceKernels::vocab_major).
struct ChunkShape {
  at::ScalarType dtype;
  int64_t chunk_rows, D, V;
  int64_t work;  // what a chunk computes: bit 0 dX, bit 1 dW, bit 2 recomputed from a given lse,
                 // 0 the forward alone
};

// A device's way of applying pass B inside the GEMMs instead of over the logits: the row kernel
// leaves other values than the gradient in z (and coefficients in RowChunk::fold), and these
// calls turn the products of those values into the gradients. Used by the CPU
// (csrc/cpu/folded_gradient.h); a device that returns no fold gets the gradient in z.
class GradientFold {
 public:
  virtual ~GradientFold() = default;
  // Before the row kernel: the chunk's fold coefficients to fill (RowChunkTensors::fold).
  virtual void start_chunk(RowChunkTensors& chunk, int64_t vocab) = 0;
  // dx holds z W: turns it into the chunk's input gradient. w_head: the weight's head.
  virtual void input(at::Tensor dx, const at::Tensor& w, int64_t w_head) = 0;
  // Adds the chunk's weight gradient to dw, with the device's GEMMs.
  virtual void weight(const DeviceKernels& dev, const at::Tensor& z, const at::Tensor& x,
                      at::Tensor dw, int64_t w_head) = 0;
  // Adds the chunk's bias gradient to db.
  virtual void bias(const at::Tensor& z, at::Tensor db) = 0;
  // After the last chunk: what the weight gradient still needs (dw_acc as the driver holds it).
  virtual void finish(at::Tensor dw_acc) = 0;
};

// What a device provides. GEMM inputs are row-major with unit inner stride.
class DeviceKernels {
 public:
  virtual ~DeviceKernels() = default;
  // The layout of the logits z[c, V] of the next chunk: vocabulary-major (z^T contiguous) or
  // row-major. The CPU chooses per shape by timing both on a shape's first chunks
  // (csrc/cpu/layout_choice.h); each chunk's time comes back through chunk_time.
  virtual bool vocab_major(const ChunkShape&) const { return false; }
  // The seconds a chunk of c rows took from its logits to its last gradient, in that layout.
  virtual void chunk_time(const ChunkShape&, bool /*vocab_major*/, int64_t /*c*/,
                          double /*seconds*/) const {}
  // Rows per chunk from the workspace budget are rounded down to a multiple of this (GEMM tiles).
  virtual int64_t chunk_row_multiple() const { return 1; }
  // Raises IndexError naming the first target outside [0, V) that is not ignore_index.
  virtual void check_targets(const at::Tensor& targets, int64_t vocab,
                             int64_t ignore_index) const = 0;
  // z[c, V] (input dtype, in the layout of vocab_major) = x[c, D] w[V, D]^T
  virtual void logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& z) const = 0;
  virtual void rows(const RowChunkTensors& chunk) const = 0;
  // dx[c, D] (input dtype) = g[c, V] w[V, D]
  virtual void grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dx) const = 0;
  // dw_acc[V, D] (float32, or float64) += g[c, V]^T x[c, D]
  virtual void grad_weight(const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& dw_acc) const = 0;
  // dw[V, D] (input dtype) = g[c, V]^T x[c, D]: a weight's whole gradient from one chunk
  virtual void grad_weight_out(const at::Tensor& g, const at::Tensor& x,
                               const at::Tensor& dw) const;  // at::mm_out
  // Called once after an op's chunks: reports what the kernels found on the device.
  virtual void finish() const {}
  // A gradient fold for this call, or none (the row kernel then writes the gradient over z).
  virtual std::unique_ptr<GradientFold> gradient_fold(const FoldRequest&) const { return nullptr; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_forward(
    const DeviceKernels& dev, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& head_weights, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, int64_t reduction, int64_t chunk_rows, std::array<bool, 3> grad_mask);

// vocab_start, vocab_total: weight holds rows [vocab_start, vocab_start + V) of a vocabulary
// of vocab_total (vocab-parallel; 0, 0 when not sharded); lse is then the global one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_backward(
    const DeviceKernels& dev, const at::Tensor& grad_rows, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, int64_t chunk_rows, std::array<bool, 3> grad_mask, int64_t vocab_start,
    int64_t vocab_total);

// Vocab-parallel forward on one shard: per row (max, sum of exp(z - max), sum of z, z_target)
// as [n, N, 4] in the accumulation dtype and the argmax as a global id [n, N] int64.
std::tuple<at::Tensor, at::Tensor> fused_stats(
    const DeviceKernels& dev, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, int64_t ignore_index,
    double softcap, int64_t vocab_start, int64_t vocab_total, int64_t chunk_rows);

// Rows per chunk: chunk_rows if > 0, else as many as fit the workspace budget (64 MiB by
// default; driver.cpp's workspace_budget), rounded down to a multiple of `multiple` when the
// budget holds at least one.
int64_t rows_per_chunk(int64_t chunk_rows, int64_t vocab, int64_t elem_bytes, int64_t total_rows,
                       int64_t multiple = 1, int64_t budget_bytes = int64_t(64) << 20);

}  // namespace mtp
