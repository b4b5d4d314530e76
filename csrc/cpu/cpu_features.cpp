#include "cpu_features.h"

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace mtp::cpu {
namespace {

// cpuid leaf `leaf`, sub-leaf `sub`: {eax, ebx, ecx, edx}; zeros where there is no such leaf (or
// no cpuid: a CPU other than x86 has none of these features).
struct Leaf {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  Leaf(unsigned leaf, unsigned sub) {
#if defined(__x86_64__) || defined(__i386__)
    if (!__get_cpuid_count(leaf, sub, &eax, &ebx, &ecx, &edx)) eax = ebx = ecx = edx = 0;
#else
    (void)leaf, (void)sub;
#endif
  }
  bool bit(unsigned reg, int b) const { return (reg >> b) & 1u; }
};

// The register state the OS saves (XCR0), or 0 where it does not enable XGETBV.
uint64_t os_saved_state() {
#if defined(__x86_64__) || defined(__i386__)
  if (!Leaf(1, 0).bit(Leaf(1, 0).ecx, 27)) return 0;  // OSXSAVE
  uint32_t lo = 0, hi = 0;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
#else
  return 0;
#endif
}

}  // namespace

bool has_amx_bf16() {
  static const bool yes = Leaf(7, 0).bit(Leaf(7, 0).edx, 22);
  return yes;
}

bool has_avx512_bf16() {
  static const bool yes = has_avx512() && Leaf(7, 1).bit(Leaf(7, 1).eax, 5);
  return yes;
}

bool has_avx512_fp16() {
  static const bool yes = has_avx512() && Leaf(7, 0).bit(Leaf(7, 0).edx, 23);
  return yes;
}

bool has_amx_fp16() {
  static const bool yes = Leaf(7, 1).bit(Leaf(7, 1).eax, 21);
  return yes;
}

bool has_avx2() {
  static const bool yes = [] {
    const Leaf l1(1, 0), l7(7, 0);
    const bool ymm_saved = (os_saved_state() & 0x6) == 0x6;  // SSE and AVX state
    return ymm_saved && l1.bit(l1.ecx, 12) /* FMA */ && l1.bit(l1.ecx, 29) /* F16C */ &&
           l7.bit(l7.ebx, 5) /* AVX2 */;
  }();
  return yes;
}

bool has_avx512() {
  static const bool yes = [] {
    const Leaf l7(7, 0);
    const bool zmm_saved = (os_saved_state() & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
    return has_avx2() && zmm_saved && l7.bit(l7.ebx, 16) /* F */ && l7.bit(l7.ebx, 17) /* DQ */ &&
           l7.bit(l7.ebx, 30) /* BW */ && l7.bit(l7.ebx, 31) /* VL */;
  }();
  return yes;
}

}  // namespace mtp::cpu
