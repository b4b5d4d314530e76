// The ops' run-time switches (which CPU kernels, layouts, 16-bit GEMMs and weight-gradient GEMMs
// to use): each read from its environment variable once, at the first use of any, and changed
// afterwards only through set_switch (the op mtp_ext::_set_switch; in Python, mtp_ext.switches).
// The hot paths read a cached value (an atomic load): no environment is read per op call or per
// chunk.
#pragma once

#include <string>
#include <vector>

namespace mtp {

enum class Switch : int {
  kCpuCapability,  // auto | default | avx2 | avx512     (MTP_EXT_CPU_CAPABILITY)
  kCpuLayout,      // auto | vocab | row                 (MTP_EXT_CPU_LAYOUT)
  kCpuDw16,        // auto | mkl | slabs                 (MTP_EXT_CPU_DW16)
  kCudaDw16,       // auto | slabs                       (MTP_EXT_CUDA_DW_SLABS=1: slabs)
  kCpuGemm16,      // auto | native | fp32               (MTP_EXT_CPU_GEMM16)
};

// The switch's setting: an index into its choices above, 0 being "auto" (the library's choice).
int switch_value(Switch s);

// Sets switch `name` ("cpu_capability", "cpu_layout", "cpu_dw16", "cuda_dw16", "cpu_gemm16") to
// one of its choices (case-insensitive; "" is "auto"); returns the previous one. Bad name or
// value: c10::ValueError naming them.
std::string set_switch(const std::string& name, const std::string& value);

// "name=value" of every switch, in the order above.
std::vector<std::string> switch_settings();

}  // namespace mtp
