// CPU row kernels: passes A and B of design.md over one chunk, vectorized with at::vec and
// parallel over rows.
#pragma once

#include "../driver.h"

namespace mtp::cpu {

void rows(const RowChunkTensors& chunk);

}  // namespace mtp::cpu
