// Which compiled set of row kernels runs (kernels/row_kernels.h): the widest the CPU has, or a
// lower one forced with MTP_EXT_CPU_CAPABILITY=default|avx2|avx512 (read at each call, like
// MTP_EXT_CPU_LAYOUT; naming one the CPU lacks, or another value, is an error).
#pragma once

#include <string>
#include <vector>

#include "kernels/row_kernels.h"

namespace mtp::cpu {

const RowKernels& row_kernels();
// "default", "avx2" or "avx512": the capability row_kernels() returns now.
std::string cpu_capability();
// The capabilities this CPU can run, lowest first.
std::vector<std::string> cpu_capabilities();

}  // namespace mtp::cpu
