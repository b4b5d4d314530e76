// CPU row kernels: passes A and B of docs/design.md over one chunk, vectorized with at::vec.
// Two layouts of the logits, chosen by the CPU device (ops_cpu.cpp, vocab_major): row-major,
// vectorized along the vocabulary and parallel over rows (rows_cpu.cpp: 16-bit logits, and
// float32/float64 in chunks of fewer than 256 rows), and vocabulary-major, vectorized across
// rows (strips_cpu.cpp: float32/float64 in chunks of 256 rows or more).
#pragma once

#include "../driver.h"

namespace mtp::cpu {

void rows(const RowChunkTensors& chunk);    // z row-major
void strips(const RowChunkTensors& chunk);  // z vocabulary-major

}  // namespace mtp::cpu
