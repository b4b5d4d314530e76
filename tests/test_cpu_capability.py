"""One build carries the CPU row kernels for each capability (default, AVX2, AVX-512) and picks
one at run time: the choice, forcing it, and that no code a lesser CPU may run needs more."""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import mtp_ext
from mtp_ext import reference

from conftest import leaf, loss_and_grads, make_inputs, norm_err, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = torch.ops.mtp_ext._cpu_capabilities()  # what this CPU runs, lowest first
X86 = platform.machine() in ("x86_64", "AMD64")


def test_widest_by_default(monkeypatch):
    monkeypatch.delenv("MTP_EXT_CPU_CAPABILITY", raising=False)
    assert HERE[0] == "default"
    assert mtp_ext.cpu_capability() == HERE[-1]
    if X86:
        from mtp_ext._cpu_check import cpu_flags
        flags = cpu_flags()
        assert ("avx512" in HERE) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
        assert ("avx2" in HERE) == ({"avx2", "fma", "f16c"} <= flags)


@pytest.mark.parametrize("value", ["sse4", "avx-512", "1"])
def test_bad_value_names_it(value, monkeypatch):
    monkeypatch.setenv("MTP_EXT_CPU_CAPABILITY", value)
    with pytest.raises(RuntimeError, match=f"MTP_EXT_CPU_CAPABILITY={value} is not one of"):
        mtp_ext.cpu_capability()
    h, w, _, y = make_inputs(4, 8, 16, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="MTP_EXT_CPU_CAPABILITY"):
        mtp_ext.linear_cross_entropy(h, w, y)


def test_bad_value_fails_the_import():
    env = dict(os.environ, MTP_EXT_CPU_CAPABILITY="avx1024")
    r = subprocess.run([sys.executable, "-c", "import mtp_ext"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "MTP_EXT_CPU_CAPABILITY=avx1024 is not one of" in r.stderr


@pytest.mark.skipif(len(HERE) == 3, reason="this CPU runs every capability")
def test_capability_the_cpu_lacks_is_refused(monkeypatch):
    lacking = [c for c in ("avx2", "avx512") if c not in HERE][0]
    monkeypatch.setenv("MTP_EXT_CPU_CAPABILITY", lacking)
    with pytest.raises(RuntimeError, match=f"MTP_EXT_CPU_CAPABILITY={lacking} but this CPU"):
        mtp_ext.cpu_capability()


@pytest.mark.parametrize("capability", HERE)
@pytest.mark.parametrize("layout", ["vocab", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_each_capability_against_float64(capability, layout, dtype, monkeypatch):
    """Every compiled set of kernels, forced, against the float64 reference (options on)."""
    monkeypatch.setenv("MTP_EXT_CPU_CAPABILITY", capability.upper())
    monkeypatch.setenv("MTP_EXT_CPU_LAYOUT", layout)
    assert mtp_ext.cpu_capability() == capability
    h, w, b, y = make_inputs(300, 40, 523, dtype, seed=11, bias=True)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy, (h, w, y, b), chunk_size=256,
                                 **opts)
    ref, ref_grads = loss_and_grads(reference.linear_cross_entropy,
                                    (h.double(), w.double(), y, b.double()),
                                    **opts)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2,
           torch.float16: 4e-3}[dtype]
    assert rel_err(loss, ref) <= tol
    for g, r in zip(grads, ref_grads):
        if r is not None:
            assert norm_err(g, r) <= tol, (capability, dtype)


def test_capabilities_agree(monkeypatch):
    """The capabilities' results differ by rounding only (exp and tanh differ in the last bits)."""
    h, w, b, y = make_inputs(64, 32, 1000, torch.float32, seed=5, bias=True)
    results = {}
    for cap in HERE:
        monkeypatch.setenv("MTP_EXT_CPU_CAPABILITY", cap)
        results[cap] = loss_and_grads(mtp_ext.linear_cross_entropy, (h, w, y, b), softcap=15.0)
    base_loss, base_grads = results["default"]
    for cap, (loss, grads) in results.items():
        assert rel_err(loss, base_loss) <= 1e-6, cap
        for g, r in zip(grads, base_grads):
            if r is not None:
                assert rel_err(g, r) <= 1e-5, cap


def _objdump():
    if not X86 or shutil.which("objdump") is None:
        pytest.skip("needs objdump on x86-64")


def test_built_library_runs_on_any_x86_64_cpu():
    """No function that code for a lesser CPU may call needs AVX2 or AVX-512
    (scripts/check_cpu_isa.py on the loaded library)."""
    _objdump()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_cpu_isa.py"),
                        mtp_ext._C.__file__], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 need more than the code that may call them" in r.stdout


SHARED = """
template <class T> __attribute__((noinline, noclone)) T scale(T* x, int n) {
  T s = 0; for (int i = 0; i < n; ++i) s += x[i] * x[i]; return s; }
"""


@pytest.mark.parametrize("wide_first", [True, False])
def test_isa_check_finds_a_wide_copy_called_from_baseline_code(wide_first, tmp_path):
    """The linker keeps the first copy of a template that two objects emit: the check must flag
    an AVX2 copy that baseline code calls, and pass when the baseline copy comes first."""
    _objdump()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    (tmp_path / "base.cpp").write_text(SHARED + "float base_sum(float* x) { return scale(x, 64); }\n")
    (tmp_path / "wide.cpp").write_text(SHARED + "namespace AVX2 { float wide_sum(float* x) { "
                                                "return scale(x, 64); } }\n")
    objs = []
    for name, flags in [("base", []), ("wide", ["-mavx2", "-mfma"])]:
        obj = str(tmp_path / f"{name}.o")
        subprocess.run([cxx, "-O3", "-fPIC", "-c", str(tmp_path / f"{name}.cpp"), "-o", obj]
                       + flags, check=True)
        objs.append(obj)
    lib = str(tmp_path / "lib.so")
    subprocess.run([cxx, "-shared", "-o", lib] + (objs[::-1] if wide_first else objs), check=True)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_cpu_isa.py"), lib],
                       capture_output=True, text=True)
    if wide_first:
        assert r.returncode == 1 and "base code may call float scale<float>" in r.stdout, r.stdout
    else:
        assert r.returncode == 0, r.stdout
