"""The CPU kernels are compiled for the vector width of the machine that built them (setup.py).
Loading them on a CPU without it would crash with an illegal instruction; say so instead."""
import platform

NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2": {"avx2", "fma"}}


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def check_cpu_capability():
    try:
        from ._build_info import CPU_CAPABILITY
    except ImportError:  # built by other means (CMake): nothing recorded
        return
    need = NEEDS.get(CPU_CAPABILITY)
    if not need or platform.machine() not in ("x86_64", "AMD64"):
        return
    flags = cpu_flags()
    if not flags:
        return
    missing = need - flags
    if missing:
        raise ImportError(
            f"mtp_ext was built for {CPU_CAPABILITY.upper()} but this CPU lacks "
            f"{sorted(missing)}; rebuild it here (pip install --no-build-isolation .) or build "
            f"a portable one with MTP_EXT_CPU_CAPABILITY=avx2 (or default)")
