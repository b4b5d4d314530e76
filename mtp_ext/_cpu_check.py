"""The CPU's feature flags, as Linux reports them, for choices made in Python (bf16 autocast by
default, the benchmark's machine line). The C++ kernels read cpuid themselves."""


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()
