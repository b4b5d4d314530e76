#!/usr/bin/env bash
# On demand (not in CI: it installs several GB): builds the full CUDA extension on a machine
# without a GPU, in a throwaway venv with torch 2.14.1 (a CUDA 13 build, which brings the cuBLAS
# and other CUDA library headers as nvidia-* wheels), imports it, and checks that the CUDA
# kernels are registered in the dispatcher.
#   VENV=/tmp/mtp_ext_cuda_venv scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/mtp_ext_cuda_venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.14.1 numpy ninja pybind11 setuptools wheel
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME=/usr/local/cuda
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
src=$(mktemp -d)
git ls-files -z | xargs -0 cp --parents -t "$src"  # a clean copy: the working tree keeps its CPU build
cd "$src"
start=$(date +%s)
FORCE_CUDA=1 "$VENV/bin/pip" install -q --no-build-isolation . 2>&1 | grep -v "^WARNING: Location" || true
echo "build: $(( $(date +%s) - start )) s (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
cd /
"$VENV/bin/python" - <<'PY'
import torch
import mtp_ext
from mtp_ext import _build_info
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| mtp_ext WITH_CUDA =", _build_info.WITH_CUDA)
for op in ("mtp_ext::fused_ce", "mtp_ext::fused_ce_backward"):
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        print(f"{op} {key}: {'registered' if ok else 'MISSING'}")
        assert ok, (op, key)
h, w, t = torch.randn(1, 6, 4), torch.randn(9, 4), torch.randint(0, 9, (1, 6))
loss = mtp_ext.linear_cross_entropy(h[0], w, t[0])
ref = torch.nn.functional.cross_entropy(h[0] @ w.t(), t[0])
assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
print("CPU op of the CUDA build matches torch; CUDA kernels registered")
PY
