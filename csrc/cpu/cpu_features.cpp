#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace mtp::cpu {
namespace {

// cpuid leaf 7, sub-leaf `sub`: {eax, ebx, ecx, edx}; zeros where there is no such leaf (or no
// cpuid: a CPU other than x86 has none of these features).
struct Leaf7 {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  explicit Leaf7(unsigned sub) {
#if defined(__x86_64__) || defined(__i386__)
    if (!__get_cpuid_count(7, sub, &eax, &ebx, &ecx, &edx)) eax = ebx = ecx = edx = 0;
#else
    (void)sub;
#endif
  }
};

}  // namespace

bool has_amx_bf16() {
  static const bool yes = (Leaf7(0).edx >> 22) & 1u;
  return yes;
}

}  // namespace mtp::cpu
