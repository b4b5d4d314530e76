#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include "../switches.h"
#include "cpu_features.h"

namespace mtp::cpu {
namespace {

struct Capability {
  const char* name;
  const RowKernels* kernels;
  bool (*runs_here)();
};

bool always() { return true; }

// Lowest first.
constexpr Capability kCapabilities[] = {
    {"default", &DEFAULT::kernels, &always},
    {"avx2", &AVX2::kernels, &has_avx2},
    {"avx512", &AVX512::kernels, &has_avx512},
};

const Capability& chosen() {
  const int forced = switch_value(Switch::kCpuCapability);  // 0: auto, else kCapabilities[forced - 1]
  if (forced > 0) {
    const Capability& c = kCapabilities[forced - 1];
    TORCH_CHECK(c.runs_here(), "mtp_ext: cpu_capability ", c.name, " (MTP_EXT_CPU_CAPABILITY) "
                "but this CPU has only ", cpu_capabilities().back(), " (one of ",
                c10::Join(", ", cpu_capabilities()), ")");
    return c;
  }
  const Capability* best = &kCapabilities[0];
  for (const Capability& c : kCapabilities) {
    if (c.runs_here()) best = &c;
  }
  return *best;
}

}  // namespace

const RowKernels& row_kernels() { return *chosen().kernels; }

std::string cpu_capability() { return chosen().name; }

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (const Capability& c : kCapabilities) {
    if (c.runs_here()) names.push_back(c.name);
  }
  return names;
}

}  // namespace mtp::cpu
