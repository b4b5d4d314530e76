"""Functions run on each of several gloo ranks by tests/test_distributed.py (see dist_helpers).
Every rank builds the same inputs from a seed, so each can compute the single-process answer."""
import math

import torch
import torch.distributed as dist

import mtp_ext

IGNORE = -100


def _inputs(seed, n, B, T, D, V, dtype, per_head, bias):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, B, T, D, generator=g, dtype=torch.float64).to(dtype)
    shape = (n, V, D) if per_head else (V, D)
    w = (torch.randn(*shape, generator=g, dtype=torch.float64) * (2 / math.sqrt(D))).to(dtype)
    b = torch.randn(*shape[:-1], generator=g, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.15] = IGNORE
    return h, w, b, labels


def _splits(V, world, uneven):
    if not uneven:
        return [mtp_ext.vocab_parallel.vocab_shard(V, rank=r) for r in range(world)]
    cuts = [0] + [V * (r + 1) // (world + 2) for r in range(world - 1)] + [V]  # rank 0 smaller
    return list(zip(cuts[:-1], cuts[1:]))


def _check_close(name, got, want, tol):
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3e} vs scale {scale:.3e}"


def vocab_parallel_matches_fused(rank, world, cases):
    for case in cases:
        dtype, per_head, bias, uneven = case["dtype"], case["per_head"], case["bias"], case["uneven"]
        opts = case["opts"]
        h, w, b, labels = _inputs(case["seed"], case["n"], 2, 24, 40, case["V"], dtype, per_head, bias)
        lo, hi = _splits(case["V"], world, uneven)[rank]
        leaves = [t.clone().requires_grad_() for t in (h, w)] + ([b.clone().requires_grad_()] if bias else [])
        full = mtp_ext.mtp_loss(leaves[0], leaves[1], labels, bias=leaves[2] if bias else None, **opts)
        go = None
        if opts.get("reduction") == "none":  # the same incoming gradient on every rank
            g = torch.Generator().manual_seed(case["seed"])
            go = torch.randn(full.loss.shape, generator=g, dtype=torch.float64).to(full.loss.dtype)
        full.loss.backward(go)
        sh = [h.clone().requires_grad_(), w[..., lo:hi, :].clone().requires_grad_()]
        if bias:
            sh.append(b[..., lo:hi].clone().requires_grad_())
        out = mtp_ext.mtp_loss(sh[0], sh[1], labels, bias=sh[2] if bias else None,
                               process_group=dist.group.WORLD, **opts)
        out.loss.backward(go)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        tag = f"{case} rank {rank}"
        _check_close(f"loss {tag}", out.loss, full.loss, tol)
        _check_close(f"head_losses {tag}", out.head_losses, full.head_losses, tol)
        assert torch.equal(out.head_tokens, full.head_tokens), tag
        assert torch.equal(out.head_accuracy, full.head_accuracy), (tag, out.head_accuracy, full.head_accuracy)
        _check_close(f"grad hidden {tag}", sh[0].grad, leaves[0].grad, tol)
        _check_close(f"grad weight shard {tag}", sh[1].grad, leaves[1].grad[..., lo:hi, :], tol)
        if bias:
            _check_close(f"grad bias shard {tag}", sh[2].grad, leaves[2].grad[..., lo:hi], tol)
    # the single-head function too
    h, w, b, labels = _inputs(7, 1, 3, 16, 32, 77, torch.float32, False, True)
    lo, hi = _splits(77, world, True)[rank]
    want = mtp_ext.linear_cross_entropy(h[0], w, labels, b, label_smoothing=0.1, softcap=5.0)
    got = mtp_ext.linear_cross_entropy(h[0], w[lo:hi], labels, b[lo:hi], label_smoothing=0.1,
                                       softcap=5.0, process_group=dist.group.WORLD)
    _check_close("linear_cross_entropy", got, want, 1e-5)


def vocab_parallel_errors(rank, world):
    h, w, b, labels = _inputs(3, 2, 2, 8, 16, 50, torch.float32, False, False)
    lo, hi = mtp_ext.vocab_parallel.vocab_shard(50)
    group = dist.group.WORLD
    bad = labels.clone()
    bad[1, 2] = 50  # inside no shard: every rank raises IndexError naming it
    try:
        mtp_ext.mtp_loss(h, w[lo:hi], bad, process_group=group)
        raise AssertionError("out-of-range label accepted")
    except IndexError as e:
        assert "labels[1, 2] = 50" in str(e) and "[0, 50)" in str(e), str(e)
    # one rank with a wrong dtype: that rank names it, the others name the rank; nobody hangs
    wr = w[lo:hi].double() if rank == 1 else w[lo:hi]
    try:
        mtp_ext.mtp_loss(h, wr, labels, process_group=group)
        raise AssertionError("mismatched dtype accepted")
    except TypeError as e:
        assert rank == 1 and "dtype" in str(e), str(e)
    except RuntimeError as e:
        assert rank != 1 and "rank(s) [1]" in str(e), str(e)
    # ranks that disagree on D
    wd = torch.randn(hi - lo, 16 + rank)
    try:
        mtp_ext.mtp_loss(h, wd, labels, process_group=group)
        raise AssertionError("mismatched D accepted")
    except ValueError as e:
        assert "hidden size D" in str(e), str(e)
    # and a good call still works afterwards
    out = mtp_ext.mtp_loss(h, w[lo:hi], labels, process_group=group)
    _check_close("loss after errors", out.loss, mtp_ext.mtp_loss(h, w, labels).loss, 1e-5)


def _tiny_model(seed, per_head=False):
    from mtp_ext.model import MTPConfig, MTPTransformer
    torch.manual_seed(seed)
    cfg = MTPConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_future=3, max_seq_len=16,
                    per_head_unembedding=per_head, z_loss=1e-3)
    return MTPTransformer(cfg)


def data_parallel_matches_single_process(rank, world, mode, per_head):
    """One training step (forward, backward, SGD with momentum) of a data-parallel model on this
    rank's share of a global batch against one process on the whole batch."""
    from mtp_ext.training import distributed as mdist
    ctx = mdist.DistContext(rank, world)
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 61, (2 * world, 16), generator=g)
    ref = _tiny_model(5, per_head)
    par = _tiny_model(5, per_head)
    wrapped = mdist.wrap(par, mode)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    par_opt = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    for step in range(2):
        ref(x, x).loss.loss.backward()
        xl = mdist.local_batch(x, ctx)
        wrapped(xl, xl).loss.loss.backward()
        ref_grads = dict(ref.named_parameters())
        for name, p in mdist.unwrap(wrapped).named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            _check_close(f"{mode} step {step} grad {name}", grad, ref_grads[name].grad, 1e-5)
        ref_opt.step()
        par_opt.step()
        ref_opt.zero_grad()
        par_opt.zero_grad()
        for name, p in mdist.unwrap(wrapped).named_parameters():
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            _check_close(f"{mode} step {step} param {name}", value, ref_grads[name], 1e-5)
    state = mdist.full_state_dict(wrapped)  # what rank 0 checkpoints: the whole model
    if rank == 0:
        assert state.keys() == ref.state_dict().keys()
        for name, p in ref.state_dict().items():
            _check_close(f"{mode} checkpoint {name}", state[name], p, 1e-5)
