// CPU row kernels: passes A and B of docs/design.md over one chunk, vectorized with at::vec.
// Two layouts of the logits, chosen per chunk by the CPU device (ops_cpu.cpp, vocab_major;
// layout_choice.h): row-major, vectorized along the vocabulary and parallel over rows
// (rows_cpu.cpp), and vocabulary-major, vectorized across rows (strips_cpu.cpp). Both take every
// dtype.
//
// The files of this folder are compiled once per CPU capability, as ATen compiles its kernels
// (setup.py, CMakeLists.txt): with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 and that
// capability's instruction-set flags, each into its own namespace; csrc/cpu/cpu_capability.cpp
// picks one set at run time. Nothing outside this folder is compiled with those flags, and
// these files define nothing outside their capability's namespace but internal code.
#pragma once

#include "../../driver.h"

namespace mtp::cpu {

struct RowKernels {
  void (*rows)(const RowChunkTensors& chunk);    // z row-major
  void (*strips)(const RowChunkTensors& chunk);  // z vocabulary-major
};

namespace DEFAULT { extern const RowKernels kernels; }
namespace AVX2 { extern const RowKernels kernels; }
namespace AVX512 { extern const RowKernels kernels; }

}  // namespace mtp::cpu
