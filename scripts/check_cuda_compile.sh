#!/usr/bin/env bash
# Compiles every CUDA source (torch-free .cu files) with nvcc for sm_80 and sm_90, warnings as
# errors, and fails if ptxas reports a register spill. Runs anywhere nvcc does (CI included).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda_compile: nvcc not found"; exit 1; }
out=$(mktemp -d)
status=0
for cu in csrc/cuda/*.cu; do
  for arch in 80 90; do
    log="$out/$(basename "$cu").sm_$arch.log"
    if ! nvcc -std=c++17 -O3 -arch=sm_$arch -Werror all-warnings -Xptxas -v -c "$cu" \
         -o "$out/$(basename "$cu").sm_$arch.o" >"$log" 2>&1; then
      cat "$log"; status=1; continue
    fi
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
    if [ -n "$spills" ]; then echo "$cu sm_$arch: spills"; echo "$spills"; status=1; fi
    echo "$cu sm_$arch: $kernels kernels, no warnings, $([ -z "$spills" ] && echo "no spills")"
  done
done
exit $status
