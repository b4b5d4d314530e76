// This capability's table of row kernels (row_kernels.h): constant-initialized, so that loading
// the library runs no code compiled for a capability the CPU may lack.
#include "row_kernels.h"

namespace mtp::cpu::CPU_CAPABILITY {

void rows(const RowChunkTensors& chunk);    // rows_cpu.cpp
void strips(const RowChunkTensors& chunk);  // strips_cpu.cpp

extern const RowKernels kernels = {&rows, &strips};

}  // namespace mtp::cpu::CPU_CAPABILITY
