#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

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
  const char* forced = std::getenv("MTP_EXT_CPU_CAPABILITY");
  if (forced && *forced) {
    std::string name(forced);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) {
      return static_cast<char>(std::tolower(ch));
    });
    for (const Capability& c : kCapabilities) {
      if (name != c.name) continue;
      TORCH_CHECK(c.runs_here(), "mtp_ext: MTP_EXT_CPU_CAPABILITY=", name, " but this CPU has ",
                  "only ", cpu_capabilities().back(), " (one of ",
                  c10::Join(", ", cpu_capabilities()), ")");
      return c;
    }
    TORCH_CHECK(false, "mtp_ext: MTP_EXT_CPU_CAPABILITY=", name, " is not one of default, avx2, "
                "avx512");
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
