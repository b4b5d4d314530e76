"""linear_cross_entropy against a float64 reference, for every option, dtype and several shapes,
on every device (conftest.device: the CPU in both logits layouts, and CUDA where present)."""
import os
import zlib

import pytest
import torch

import mtp_ext
from mtp_ext import reference, switches
from mtp_ext._cpu_check import cpu_flags

from conftest import IGNORE, as64, loss_and_grads, make_inputs, norm_err, on, rel_err

OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
]
SHAPES = [  # (N, D, V): one row, V not a multiple of the vector width, odd D, GPT-2's V, and
    # V a multiple of 8 but not 16, and of 16 (the CUDA kernel's 16-byte loads in every dtype)
    (1, 8, 33),
    (37, 19, 101),
    (64, 32, 1000 + 3),
    (12, 16, 50257),
    (16, 24, 2056),
    (32, 40, 4096),
]


def seed_of(*parts):
    """A seed fixed by the test's parameters (hash() of a str changes from process to process)."""
    return zlib.crc32(repr(parts).encode()) % 10000


def check_against_f64(dtype, N, D, V, opts, *, bias, reduction, chunk_size, seed, device="cpu"):
    h, w, b, y = make_inputs(N, D, V, dtype, seed=seed, bias=bias)
    tensors = on(device, h, w, y, b)
    # a random upstream gradient, never 1: the path that loss scaling and accumulation take
    g = torch.Generator().manual_seed(seed)
    go = torch.rand(N if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, **opts)
    loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy, tensors, go.to(device),
                                 chunk_size=chunk_size, **kw)
    ref_loss, ref_grads = loss_and_grads(reference.linear_cross_entropy,
                                         (as64(h), as64(w), y, as64(b)), go, **kw)
    errs = [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)
                                        if r is not None]
    if dtype == torch.float32:
        assert max(errs) <= 1e-5, errs
    elif dtype == torch.float64:
        assert max(errs) <= 1e-10, errs
    else:  # 16-bit: no worse than twice the error of the PyTorch path in the same dtype
        errs = [norm_err(loss, ref_loss)] + [norm_err(g, r) for g, r in zip(grads, ref_grads)
                                             if r is not None]
        r16_loss, r16_grads = loss_and_grads(reference.linear_cross_entropy, tensors,
                                             go.to(device), **kw)
        r16 = [norm_err(r16_loss, ref_loss)] + [norm_err(g, r) for g, r in zip(r16_grads, ref_grads)
                                                if r is not None]
        # The scalar loss is one sum of rounding errors whose size in either path is chance: it
        # may also be off by half an ulp of the dtype. So may a gradient of a few elements (one
        # row); larger gradients are compared as whole tensors.
        half_ulp = torch.finfo(dtype).eps / 2
        assert errs[0] <= 2 * r16[0] + half_ulp, (errs, r16)
        sizes = [r.numel() for r in ref_grads if r is not None]
        for e, e16, size in zip(errs[1:], r16[1:], sizes):
            assert e <= 2 * e16 + (half_ulp if size < 256 else 1e-4), (errs, r16)
    return errs


@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shapes_dtypes(N, D, V, dtype, device):
    check_against_f64(dtype, N, D, V, {}, bias=False, reduction="mean", chunk_size=None,
                      seed=N * 7 + V, device=device)


@pytest.mark.parametrize("V", [301, 256])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_options(opts, reduction, bias, dtype, V, device):
    check_against_f64(dtype, 45, 24, V, opts, bias=bias, reduction=reduction, chunk_size=16,
                      seed=seed_of(reduction, bias, opts, V), device=device)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunk_sizes_agree(chunk_size, device):
    h, w, b, y = on(device, *make_inputs(50, 16, 257, torch.float32, seed=3, bias=True))
    base, base_g = loss_and_grads(mtp_ext.linear_cross_entropy, (h, w, y, b), chunk_size=50)
    loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy, (h, w, y, b), chunk_size=chunk_size)
    assert rel_err(loss, base) <= 1e-6
    for g, r in zip(grads, base_g):
        if r is not None:
            assert rel_err(g, r) <= 1e-6


def test_leading_shape_and_noncontiguous(device):
    g = torch.Generator().manual_seed(11)
    h = torch.randn(3, 16, 5, generator=g).to(device).transpose(1, 2)   # [3, 5, 16], non-contiguous
    w = (torch.randn(40, 2 * 16, generator=g) * 0.3).to(device)[:, ::2]  # [40, 16], strided
    y = torch.randint(0, 40, (5, 3), generator=g).to(device).t()        # [3, 5], non-contiguous
    assert not (h.is_contiguous() or w.is_contiguous() or y.is_contiguous())
    for red in ("mean", "sum", "none"):
        go = torch.rand(3, 5, dtype=torch.float64, device=device) + 0.5 if red == "none" else None
        loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy, (h, w, y), go, reduction=red)
        ref, rgrads = loss_and_grads(reference.linear_cross_entropy, (as64(h), as64(w), y), go,
                                     reduction=red)
        assert loss.shape == ref.shape == ((3, 5) if red == "none" else ())
        assert rel_err(loss, ref) < 1e-5
        for a, r in zip(grads, rgrads):
            if r is not None:
                assert rel_err(a, r) < 1e-5


def test_integer_target_dtypes(device):
    h, w, _, y = on(device, *make_inputs(20, 8, 50, torch.float32, seed=5, ignore_frac=0.0))
    ref = mtp_ext.linear_cross_entropy(h, w, y)
    for dt in (torch.int32, torch.int16, torch.uint8):
        yy = y.clamp(max=49).to(dt)
        assert torch.equal(mtp_ext.linear_cross_entropy(h, w, yy), mtp_ext.linear_cross_entropy(h, w, yy.long()))


def test_all_ignored_and_empty(device):
    h, w, _, y = on(device, *make_inputs(6, 8, 30, torch.float32, seed=2))
    y[:] = IGNORE
    assert torch.isnan(mtp_ext.linear_cross_entropy(h, w, y))
    assert torch.isnan(reference.linear_cross_entropy(h, w, y))
    assert mtp_ext.linear_cross_entropy(h, w, y, reduction="sum").item() == 0.0
    hh = h.clone().requires_grad_()
    mtp_ext.linear_cross_entropy(hh, w, y, reduction="sum").backward()
    assert torch.count_nonzero(hh.grad) == 0
    # N = 0 behaves like torch: nan mean, zero sum, empty none
    e = torch.empty(0, 8, device=device)
    t = torch.empty(0, dtype=torch.long, device=device)
    assert torch.isnan(mtp_ext.linear_cross_entropy(e, w, t))
    assert mtp_ext.linear_cross_entropy(e, w, t, reduction="sum").item() == 0.0
    assert mtp_ext.linear_cross_entropy(e, w, t, reduction="none").shape == (0,)


def test_nan_and_inf_inputs_give_nan_not_crash(device):
    h, w, _, y = on(device, *make_inputs(10, 8, 30, torch.float32, seed=9, ignore_frac=0.0))
    for bad in (float("nan"), float("inf")):
        hb = h.clone()
        hb[3, 2] = bad
        out = mtp_ext.linear_cross_entropy(hb, w, y, reduction="none")
        assert torch.isnan(out[3]) or torch.isinf(out[3])
        assert torch.isfinite(out[[0, 1, 2, 4]]).all()
        assert not torch.isfinite(mtp_ext.linear_cross_entropy(hb, w, y))


def test_nan_and_inf_inputs_with_gradients_give_nan(device):
    """The gradient-in-forward path (on the CPU, pass B folded into the GEMMs) keeps nan too:
    in the bad row's loss and gradient, and nowhere else in the input gradient."""
    h, w, _, y = on(device, *make_inputs(10, 8, 30, torch.float32, seed=9, ignore_frac=0.0))
    for bad in (float("nan"), float("inf")):
        hb = h.clone()
        hb[3, 2] = bad
        loss = mtp_ext.linear_cross_entropy(hb.requires_grad_(), w, y)
        assert not torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(hb.grad[[0, 1, 2, 4, 5, 6, 7, 8, 9]]).all()
        assert not torch.isfinite(hb.grad[3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)],
                         ids=["plain", "smoothing,z_loss"])
def test_logits_spanning_far_more_than_exp_range(dtype, opts, device):
    """Row maxima that rise by 80-250 after the first vocabulary block (the CPU's folded gradient
    stores exponentials against a reference and rescales them then): equal to float64."""
    h, w, b, y = make_inputs(40, 16, 700, torch.float64, seed=5, bias=True, ignore_frac=0.1)
    b[:40] = -100.0
    b[300] = 80.0
    b[600:610] = 150.0
    h[::3] *= 30
    y[5] = 605
    y[6] = 300
    tensors = tuple((t.to(dtype) if t.is_floating_point() else t).to(device) for t in (h, w, y, b))
    loss, grads = loss_and_grads(mtp_ext.linear_cross_entropy, tensors, None, chunk_size=16, **opts)
    ref_loss, ref_grads = loss_and_grads(reference.linear_cross_entropy, (h, w, y, b), None, **opts)
    errs = [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)
                                        if r is not None]
    assert torch.isfinite(loss)
    assert max(errs) <= (1e-5 if dtype == torch.float32 else 1e-10), errs


@pytest.mark.parametrize("V", [4099, 4096])
def test_fp16_bf16_logits_error_bounded(V, device):
    """16-bit inputs: fused error against float64 no worse than twice PyTorch's own bf16 path."""
    for dt in (torch.bfloat16, torch.float16):
        check_against_f64(dt, 256, 64, V, dict(z_loss=1e-4, label_smoothing=0.1), bias=True,
                          reduction="mean", chunk_size=100, seed=77, device=device)


@pytest.mark.parametrize("path", ["default", "mkl", "slabs", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D", [(200, 48), (40, 2048)])  # D = 2048: 3 slabs of <= 1024 rows
def test_16bit_gemm_paths(N, D, dtype, path):
    """Each CPU path of the 16-bit products, forced, within the accuracy bound, and it is that
    path that ran (the op counts the calls of each): native 16-bit GEMMs with the weight
    gradient through MKL's mixed GEMM or ATen's slabs (cpu_dw16), or every product in fp32
    (cpu_gemm16). By default fp32 where the CPU lacks the type's dot products (AVX512-BF16 or
    AMX-BF16; AVX512-FP16 or AMX-FP16), else MKL's mixed GEMM, except bf16 without AMX: the
    slabs."""
    info = torch.ops.mtp_ext._cpu_gemm16_info
    mkl_available, amx, bf16_dot, fp16_dot = info()[3:]
    if os.path.exists("/proc/cpuinfo"):
        flags = cpu_flags()
        assert amx == ("amx_bf16" in flags)
        assert bf16_dot == bool({"avx512_bf16", "amx_bf16"} & flags)
        assert fp16_dot == bool({"avx512_fp16", "amx_fp16"} & flags)
    if path == "mkl" and not mkl_available:
        pytest.skip("this libtorch exports no MKL mixed GEMM")
    force = {"default": {}, "fp32": dict(cpu_gemm16="fp32")}.get(
        path, dict(cpu_gemm16="native", cpu_dw16=path))
    before = info()[:3]
    with switches.forced(**force):
        check_against_f64(dtype, N, D, 3001, {}, bias=True, reduction="mean", chunk_size=16,
                          seed=31)
    ran = [a - b > 0 for a, b in zip(info()[:3], before)]
    if path == "default":
        if not (bf16_dot if dtype == torch.bfloat16 else fp16_dot):
            path = "fp32"
        else:
            path = "mkl" if (amx or dtype == torch.float16) and mkl_available else "slabs"
    assert ran == [path == "mkl", path == "slabs", path == "fp32"], ran


def test_16bit_gemm_bad_choice():
    with pytest.raises(ValueError, match="switch cpu_dw16 must be one of auto, mkl, slabs, got "
                       "fast"):
        switches.set("cpu_dw16", "fast")
    with pytest.raises(ValueError, match="switch cpu_gemm16 must be one of auto, native, fp32, "
                       "got bf32"):
        switches.set("cpu_gemm16", "bf32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_masked_vocabulary_with_minus_inf_bias(dtype, grad, device):
    """A bias of -inf masks tokens (here the first 700, more than one block, and some others)."""
    h, w, b, y = make_inputs(40, 16, 2000, torch.float32, seed=12, bias=True, ignore_frac=0.1)
    b[:700] = float("-inf")
    b[1500:1510] = float("-inf")
    y[y >= 0] = 700 + y[y >= 0] % 800
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    hh = h.clone().to(device).requires_grad_(grad)
    loss = mtp_ext.linear_cross_entropy(hh, *on(device, w, y, b), chunk_size=16).cpu()
    ref = reference.linear_cross_entropy(h.double(), w.double(), y, b.double())
    assert torch.isfinite(loss)
    assert rel_err(loss, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)
    if grad:
        loss.backward()
        assert torch.isfinite(hh.grad).all()
