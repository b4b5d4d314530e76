"""Builds mtp_ext._C: the CPU kernels always; the CUDA kernels when FORCE_CUDA=1, or when torch is
a CUDA build and nvcc is found. Build with `pip install --no-build-isolation .` so that the
installed torch is used (an isolated build would fetch another one)."""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its SIMD width at compile time; the extension is built on (and for) the machine
# that installs it. MTP_EXT_CPU_CAPABILITY=default|avx2|avx512 overrides the detection, e.g. for
# a build meant for other machines.
CPU_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def cpu_capability():
    chosen = os.environ.get("MTP_EXT_CPU_CAPABILITY", "").lower()
    if chosen:
        if chosen not in CPU_FLAGS:
            raise ValueError(f"MTP_EXT_CPU_CAPABILITY={chosen!r}: use one of {sorted(CPU_FLAGS)}")
        return chosen
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(l for l in f if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def write_build_info(cap, cuda):
    with open(os.path.join(ROOT, "mtp_ext", "_build_info.py"), "w") as f:
        f.write(f"# written by setup.py\nCPU_CAPABILITY = {cap!r}\nWITH_CUDA = {cuda!r}\n")


def extension():
    cap = cpu_capability()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"] + CPU_FLAGS[cap]
    args = dict(name="mtp_ext._C", sources=sources, extra_compile_args={"cxx": cxx},
                include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True,
                define_macros=[("Py_LIMITED_API", "0x03090000")])
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cuda = want_cuda()
    write_build_info(cap, cuda)
    if not cuda:
        return cpp_extension.CppExtension(**args)
    args["sources"] += cuda_sources
    args["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"]
    # cuBLAS and the other CUDA library headers come with the nvidia-* wheels of a pip-installed
    # CUDA torch; a toolkit that has only nvcc finds them there, after its own headers (only the
    # torch glue, compiled by the host compiler, needs them).
    try:
        import nvidia
        for d in glob.glob(os.path.join(nvidia.__path__[0], "cu*", "include")):
            args["extra_compile_args"]["cxx"] += ["-idirafter", d]
    except ImportError:
        pass
    import torch
    if not torch.cuda.is_available():
        # no GPU to build for: Ampere and Hopper code, and PTX that newer GPUs compile at load
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return cpp_extension.CUDAExtension(**args)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
