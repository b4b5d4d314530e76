// Launchers of the CUDA row kernels (passes A and B of docs/design.md). No torch header: this file
// and rows_cuda.cu compile with nvcc alone; csrc/cuda/ops_cuda.cpp binds them to torch.
#pragma once

#include <cuda_runtime.h>

#include "../common/row_chunk.h"

namespace mtp::cuda {

// One thread block per row of the chunk, on `stream`. A target outside [0, V) that is not
// ignore_index is treated as ignored, and *first_bad (all ones before the op) is lowered to its
// flattened row: the caller checks it once after the whole op. S: float, double, __nv_bfloat16
// or __half storage.
template <class A, class S>
cudaError_t launch_rows(const RowChunk<A, S>& chunk, int64_t row_offset,
                        unsigned long long* first_bad, cudaStream_t stream);

}  // namespace mtp::cuda
