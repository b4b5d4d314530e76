"""The run-time switches: which CPU row kernels, logits layout, 16-bit products and 16-bit
weight-gradient GEMM the ops use, and whether decoding prepacks its weights. Each is read from
its environment variable once (the ops' at their first use, which `import mtp_ext` makes; packed
decoding at import) and changed afterwards only here: no environment variable is read per op
call, per chunk or per decoding step, and changing one is a single atomic store (safe while other
threads run ops).

    name            choices                       environment variable
    cpu_capability  auto, default, avx2, avx512   MTP_EXT_CPU_CAPABILITY
    cpu_layout      auto, vocab, row              MTP_EXT_CPU_LAYOUT
    cpu_dw16        auto, mkl, slabs              MTP_EXT_CPU_DW16
    cuda_dw16       auto, slabs                   MTP_EXT_CUDA_DW_SLABS (1: slabs)
    cpu_gemm16      auto, native, fp32            MTP_EXT_CPU_GEMM16
    packed_decoding auto, off                     MTP_EXT_PACKED_DECODING (0: off)

"auto" is the library's own choice (docs/design.md, docs/building.md)."""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List

import torch

from . import _C  # noqa: F401  (registers the ops)

_PACKED = {"auto", "off"}
_packed_decoding = {"0": "off"}.get(os.environ.get("MTP_EXT_PACKED_DECODING", ""), "auto")


def packed_decoding() -> bool:
    """The packed_decoding switch, for mtp_ext.decoding.packed_linear (a cached value)."""
    return _packed_decoding != "off"


def cpu_products_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the CPU ops multiply operands of this dtype in fp32 now (the cpu_gemm16 switch;
    auto: bf16 and fp16 where the CPU lacks their dot-product instructions: AVX512-BF16 or
    AMX-BF16, AVX512-FP16 or AMX-FP16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    forced = get("cpu_gemm16")
    if forced != "auto":
        return forced == "fp32"
    return not torch.ops.mtp_ext._cpu_gemm16_info()[5 if dtype == torch.bfloat16 else 6]


def cpu_layout_trials() -> List[Dict[str, object]]:
    """The CPU's logits layout per chunk shape, as measured so far in this process (cpu_layout
    auto; docs/design.md, "The CPU's two layouts"): per shape its dtype, chunk rows, D, V, the
    chunk's work (bit 0 dX, bit 1 dW, bit 2 recomputed from a given lse), the choice ("vocab",
    "row", or None while both are still being tried), the median microseconds per row of each
    layout and the chunks timed."""
    flat = torch.ops.mtp_ext._cpu_layout_trials()
    dtypes = {6: "float32", 7: "float64", 15: "bfloat16", 5: "float16"}
    out = []
    for i in range(0, len(flat), 9):
        d, c, D, V, work, choice, row_us, vocab_us, chunks = flat[i:i + 9]
        out.append(dict(dtype=dtypes.get(int(d), str(int(d))), chunk_rows=int(c), D=int(D),
                        V=int(V), work=int(work),
                        choice={-1: None, 0: "row", 1: "vocab"}[int(choice)],
                        row_us=row_us, vocab_us=vocab_us, chunks=int(chunks)))
    return out


def settings() -> Dict[str, str]:
    """Every switch's current choice."""
    out = dict(s.split("=", 1) for s in torch.ops.mtp_ext._switches())
    out["packed_decoding"] = _packed_decoding
    return out


def get(name: str) -> str:
    s = settings()
    if name not in s:
        raise ValueError(f"no switch named {name!r} (one of {', '.join(s)})")
    return s[name]


def set(name: str, value: str) -> str:
    """Sets switch `name` to `value` (one of its choices); returns the previous choice. A bad
    name or value: ValueError naming it."""
    global _packed_decoding
    if name == "packed_decoding":
        value = (value or "auto").lower()
        if value not in _PACKED:
            raise ValueError(f"switch packed_decoding must be one of auto, off, got {value!r}")
        previous, _packed_decoding = _packed_decoding, value
        return previous
    return torch.ops.mtp_ext._set_switch(name, str(value))


@contextlib.contextmanager
def forced(**choices: str):
    """Within it, the named switches take the given choices; the previous ones come back after:
    `with mtp_ext.switches.forced(cpu_layout="row", cpu_dw16="slabs"): ...`."""
    previous = {}
    try:
        for name, value in choices.items():
            previous[name] = set(name, value)
        yield
    finally:
        for name, value in previous.items():
            set(name, value)
