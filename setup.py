"""Builds mtp_ext._C: the CPU kernels always; the CUDA kernels when FORCE_CUDA=1, or when torch is
a CUDA build and nvcc is found. Build with `pip install --no-build-isolation .` so that the
installed torch is used (an isolated build would fetch another one)."""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))

# The row kernels (csrc/cpu/kernels) are compiled once per CPU capability, each into its own
# namespace with its own flags (ATen's), and chosen at run time (csrc/cpu/cpu_capability.cpp);
# everything else is compiled for any CPU of the architecture, so one build serves every x86-64
# machine. DEFAULT comes first: the linker keeps the first copy of the code the three share
# (scripts/check_cpu_isa.py checks the result). -Wno-psabi: GCC's note that passing vectors
# changed ABI in GCC 4.6 concerns functions internal to these files.
X86 = platform.machine() in ("x86_64", "AMD64")
KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"] if X86 else [],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512"] if X86 else [],
}


class BuildExtension(cpp_extension.BuildExtension):
    def build_extension(self, ext):
        for cap, flags in CAPABILITY_FLAGS.items():
            flags = flags + ["-Wno-psabi", f"-DCPU_CAPABILITY={cap}"]
            ext.extra_objects += self.compiler.compile(
                KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, cap.lower()),
                macros=ext.define_macros, include_dirs=ext.include_dirs,
                extra_postargs=ext.extra_compile_args["cxx"] + flags)
        super().build_extension(ext)


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def write_build_info(cuda):
    with open(os.path.join(ROOT, "mtp_ext", "_build_info.py"), "w") as f:
        f.write(f"# written by setup.py\nWITH_CUDA = {cuda!r}\n")


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden"]
    args = dict(name="mtp_ext._C", sources=sources, extra_compile_args={"cxx": cxx},
                include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True,
                define_macros=[("Py_LIMITED_API", "0x03090000")])
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cuda = want_cuda()
    write_build_info(cuda)
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
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
