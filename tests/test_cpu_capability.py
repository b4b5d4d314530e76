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
from mtp_ext import reference, switches

from conftest import leaf, loss_and_grads, make_inputs, norm_err, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = torch.ops.mtp_ext._cpu_capabilities()  # what this CPU runs, lowest first
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(autouse=True)
def restore_switches():
    """Each test leaves the switches as it found them."""
    before = switches.settings()
    yield
    for name, value in before.items():
        switches.set(name, value)


def test_widest_by_default():
    switches.set("cpu_capability", "auto")
    assert HERE[0] == "default"
    assert mtp_ext.cpu_capability() == HERE[-1]
    if X86:
        from mtp_ext._cpu_check import cpu_flags
        flags = cpu_flags()
        assert ("avx512" in HERE) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
        assert ("avx2" in HERE) == ({"avx2", "fma", "f16c"} <= flags)


@pytest.mark.parametrize("value", ["sse4", "avx-512", "1"])
def test_bad_value_names_it(value):
    before = switches.get("cpu_capability")  # auto, or what MTP_EXT_CPU_CAPABILITY forced
    with pytest.raises(ValueError, match=f"switch cpu_capability must be one of auto, default, "
                       f"avx2, avx512, got {value}"):
        switches.set("cpu_capability", value)
    with pytest.raises(ValueError, match="no switch named cpu_kernels"):
        switches.set("cpu_kernels", "auto")
    assert switches.get("cpu_capability") == before  # unchanged


@pytest.mark.parametrize("var,value", [("MTP_EXT_CPU_CAPABILITY", "avx1024"),
                                       ("MTP_EXT_CPU_LAYOUT", "diagonal"),
                                       ("MTP_EXT_CPU_DW16", "fast"),
                                       ("MTP_EXT_CPU_GEMM16", "bf32")])
def test_bad_environment_fails_the_import(var, value):
    env = dict(os.environ, **{var: value})
    r = subprocess.run([sys.executable, "-c", "import mtp_ext"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and f"{var} must be one of" in r.stderr and value in r.stderr


def test_the_environment_is_read_once():
    """Set after the import, an environment variable changes nothing (it would raise if the ops
    read it: the value is not a choice); the environment at the start does set the switches."""
    code = ("import os, torch, mtp_ext; from mtp_ext import switches\n"
            "print(switches.settings())\n"
            "for v in ('MTP_EXT_CPU_CAPABILITY', 'MTP_EXT_CPU_LAYOUT', 'MTP_EXT_CPU_DW16',\n"
            "          'MTP_EXT_PACKED_DECODING'): os.environ[v] = 'bad'\n"
            "h = torch.randn(300, 16, dtype=torch.bfloat16, requires_grad=True)\n"
            "w = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)\n"
            "mtp_ext.linear_cross_entropy(h, w, torch.randint(0, 64, (300,)), chunk_size=8)"
            ".backward()\n"
            "print(switches.settings(), mtp_ext.cpu_capability())\n")
    env = dict(os.environ, MTP_EXT_CPU_LAYOUT="row", MTP_EXT_CPU_DW16="slabs",
               MTP_EXT_CPU_GEMM16="native", MTP_EXT_PACKED_DECODING="0", MTP_EXT_CPU_CAPABILITY="default")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    want = {"cpu_capability": "default", "cpu_layout": "row", "cpu_dw16": "slabs",
            "cuda_dw16": "auto", "cpu_gemm16": "native", "packed_decoding": "off"}
    assert eval(first) == want and second == f"{want} default"


@pytest.mark.skipif(len(HERE) == 3, reason="this CPU runs every capability")
def test_capability_the_cpu_lacks_is_refused():
    lacking = [c for c in ("avx2", "avx512") if c not in HERE][0]
    switches.set("cpu_capability", lacking)
    with pytest.raises(RuntimeError, match=f"cpu_capability {lacking} .* but this CPU"):
        mtp_ext.cpu_capability()


@pytest.mark.parametrize("capability", HERE)
@pytest.mark.parametrize("layout", ["vocab", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_each_capability_against_float64(capability, layout, dtype):
    """Every compiled set of kernels, forced, against the float64 reference (options on)."""
    switches.set("cpu_capability", capability.upper())
    switches.set("cpu_layout", layout)
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


def test_capabilities_agree():
    """The capabilities' results differ by rounding only (exp and tanh differ in the last bits)."""
    h, w, b, y = make_inputs(64, 32, 1000, torch.float32, seed=5, bias=True)
    results = {}
    for cap in HERE:
        switches.set("cpu_capability", cap)
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
