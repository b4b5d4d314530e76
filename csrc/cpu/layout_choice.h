// The CPU's choice of logits layout per chunk shape (DeviceKernels::vocab_major), by measurement:
// which layout runs a chunk faster depends on the CPU's GEMMs at that shape (MKL's or oneDNN's
// kernels for each operand layout), and no constant chosen on one CPU holds on another
// (docs/design.md, "The CPU's two layouts"). Each shape of large enough chunks tries both
// layouts on its first chunks, in the order row, vocab, vocab, row, row, vocab, and then keeps
// the one of the smaller median time per row. The chunks are the call's own work, so trying costs
// no memory and no extra computation. Smaller chunks take a default. The cpu_layout switch
// (MTP_EXT_CPU_LAYOUT=vocab|row) forces one layout and stops the trials.
#pragma once

#include <cstdint>
#include <vector>

#include "../driver.h"

namespace mtp::cpu {

// Chunks below this many logits multiply-adds (c x D x V) take the default layout: their time is
// too short to measure against the noise, and their layout matters little.
constexpr double kLayoutTrialWork = double(int64_t(1) << 30);

// The layout of the next chunk of this shape: one to try, the measured one, or `fallback` (small
// chunks).
bool choose_vocab_major(const ChunkShape& shape, bool fallback);
// A chunk of c rows of this shape took `seconds` in that layout.
void record_chunk_time(const ChunkShape& shape, bool vocab_major, int64_t c, double seconds);
// Every shape tried so far: {dtype, chunk rows, D, V, work, choice (-1 still trying, 0 row,
// 1 vocab), median microseconds per row in row layout, in vocab layout, chunks timed}.
std::vector<std::vector<double>> layout_trials();

}  // namespace mtp::cpu
