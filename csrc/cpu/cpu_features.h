// What the CPU computes natively, read from cpuid: kernel choices that measured differently on
// CPUs with and without these (docs/design.md, "Precision") are made from them.
#pragma once

namespace mtp::cpu {

bool has_amx_bf16();  // Intel AMX with bf16 tiles (Sapphire Rapids and later)

}  // namespace mtp::cpu
