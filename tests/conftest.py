import math
import os
import tempfile

import pytest
import torch

# decoding's measured step times (mtp_ext.decoding.cost_model) go to a fresh folder, not ~/.cache
os.environ["MTP_EXT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtp_ext_test_cache_")

import mtp_ext
from mtp_ext import reference, switches

IGNORE = -100


def make_inputs(N, D, V, dtype, *, seed, bias=False, ignore_frac=0.2, scale=2.0):
    """Fresh random inputs (never zeros), rounded to dtype; targets with some ignore_index."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (scale / math.sqrt(D))
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(h), cast(w), cast(b), y


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def loss_and_grads(fn, tensors, grad_out=None, **kw):
    """Runs fn(*tensors, **kw) on fresh leaves; returns (loss, [grads]) with grads in float64."""
    leaves = [leaf(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in tensors]
    out = fn(*leaves, **kw)
    loss = out.loss if isinstance(out, mtp_ext.MTPLossOutput) else out
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
    loss.backward(go)
    grads = [None if not (isinstance(t, torch.Tensor) and t.requires_grad) or t.grad is None
             else t.grad.cpu().double() for t in leaves]
    return loss.detach().cpu().double(), grads


def on(device, *tensors):
    """The tensors (None stays None) on device."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def _nan_aware(a, b):
    """(a, b) without the entries where both are nan; None when nan appears in one only."""
    a, b = a.double().cpu(), b.double().cpu()
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return None
    return a[~na], b[~nb]


def rel_err(a, b):
    """max |a - b| / max |b| (absolute where b is all zeros); nan matches nan only."""
    pair = _nan_aware(a, b)
    if pair is None:
        return math.inf
    a, b = pair
    denom = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / denom if denom > 0 else diff


def norm_err(a, b):
    """||a - b|| / ||b||: the error measure for 16-bit results, robust to single-ulp outliers;
    nan matches nan only."""
    pair = _nan_aware(a, b)
    if pair is None:
        return math.inf
    a, b = pair
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def as64(t):
    return None if t is None else t.double()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture()
def corpus(tmp_path):
    """A small folder of Python-like text files (and one binary file, which is skipped)."""
    d = tmp_path / "corpus"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["def ", "return ", "self", "(x)", ":\n    ", "import os\n", "class A:\n"]
    for i in range(40):
        idx = torch.randint(0, len(words), (400,), generator=g).tolist()
        (d / f"f{i}.py").write_text("".join(words[j] for j in idx))
    (d / "blob.bin").write_bytes(b"\x00\x01\x02")
    return d


HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


MKL_MIXED_GEMM = bool(torch.ops.mtp_ext._cpu_gemm16_info()[3])


def product_calls(prof) -> int:
    """The CPU GEMMs of the loss in a torch.profiler trace: aten::mm/addmm_, with each fp32
    product of 16-bit operands (a scope mtp_ext::*_fp32 of several slab GEMMs) counted once."""
    names = [e.name for e in prof.events()]
    fp32 = sum(n.startswith("mtp_ext::") and n.endswith("_fp32") for n in names)
    return fp32 if fp32 else sum(n in ("aten::mm", "aten::addmm_") for n in names)


@pytest.fixture(params=["cpu-vocab-native-mkl", "cpu-row-fp32",
                        pytest.param("cuda", marks=needs_cuda)])
def device(request):
    """The device a test body runs on: the CPU with each of its forced kernel choices, and CUDA
    where a device is present. One test body for every device. The two CPU cases force both
    layouts of fp32/fp64 logits (the cpu_layout switch) and both ways of multiplying 16-bit
    operands (cpu_gemm16): natively, with MKL's mixed GEMM for the weight gradient where libtorch
    has it (cpu_dw16), and in fp32, whatever this CPU would choose."""
    if request.param.startswith("cpu-"):
        _, layout, gemm16, *dw16 = request.param.split("-")
        force = dict(cpu_layout=layout, cpu_gemm16=gemm16)
        if dw16 and MKL_MIXED_GEMM:
            force["cpu_dw16"] = dw16[0]
        with switches.forced(**force):
            yield "cpu"
    else:
        yield "cuda"


@pytest.fixture(params=["vocab", "row"])
def cpu_layout(request):
    """Both CPU layouts of fp32/fp64 logits (by default chosen by chunk size, >= 256 rows:
    vocabulary-major with the folded gradient; smaller: row-major with pass B)."""
    with switches.forced(cpu_layout=request.param):
        yield request.param
