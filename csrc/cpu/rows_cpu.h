// CPU row kernels: passes A and B of design.md over one chunk, vectorized with at::vec. Two
// layouts of the logits, chosen per dtype by the CPU device (ops_cpu.cpp): row-major, vectorized
// along the vocabulary and parallel over rows (rows_cpu.cpp, 16-bit), and vocabulary-major,
// vectorized across rows (strips_cpu.cpp, float32/float64).
#pragma once

#include "../driver.h"

namespace mtp::cpu {

void rows(const RowChunkTensors& chunk);    // z row-major
void strips(const RowChunkTensors& chunk);  // z vocabulary-major

}  // namespace mtp::cpu
