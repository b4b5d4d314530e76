// What the CPU computes natively, read from cpuid: kernel choices that measured differently on
// CPUs with and without these (docs/design.md, "Precision") are made from them, and the row
// kernels' capability (cpu_capability.h). False for every feature off x86.
#pragma once

namespace mtp::cpu {

bool has_amx_bf16();  // Intel AMX with bf16 tiles (Sapphire Rapids and later)
bool has_amx_fp16();  // Intel AMX with fp16 tiles (Granite Rapids and later)
bool has_avx512_bf16();  // AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, AMD Zen 4)
bool has_avx512_fp16();  // AVX512-FP16 arithmetic (Sapphire Rapids and later)
bool has_avx2();      // AVX2, FMA and F16C, with the OS saving the ymm registers
bool has_avx512();    // AVX-512 F, BW, VL and DQ, with the OS saving the zmm and mask registers

}  // namespace mtp::cpu
