"""How much of the loss's backward a gradient filter could skip, on real hidden states.

    python bench/bench_grad_filter.py --checkpoint runs/bpe8k/checkpoint.pt [--dump hidden.pt]

A `mtp-ext train --tokenizer bpe` checkpoint's heads run over held-out text (windows of the
validation split); their final hidden states and labels are what the fused loss sees (--dump
saves them). For each head, with the softmax p of the logits:

- for thresholds from 2^-12 (cut-cross-entropy's bf16 threshold) down, the share of entries
  p >= threshold, and the
  share of vocabulary blocks [rows x block] holding one, in the vocabulary's own order and
  sorted by token frequency in the training split: the share of dX = G W and dW += G^T X that a
  block filter must still compute (the target's -1 is exact, apart from the filter);
- the softmax mass dropped per row;
- the error of the gradients with the small entries dropped (computed in float64, so it is the
  filter's own error), and of the dense bf16 fused loss, both against the float64 dense
  gradients (max |error| / max |reference|);
- the dense bf16 fused loss's forward + backward time against its GEMM floor.
"""
import argparse
import math
import statistics
import sys

import torch

import mtp_ext
from mtp_ext.training import tokenizer as tokenizers
from mtp_ext.benchmark import time_step
from mtp_ext.training.train import eval_batches, load_corpus_files, load_model


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def grads(h, w, y, keep=None):
    """Float64 dense gradients of mean cross-entropy (dX, dW); keep: a mask of the softmax
    entries kept (the rest dropped), the target's -1 always kept."""
    h, w = h.double(), w.double()
    p = (h @ w.T).softmax(-1)
    if keep is not None:
        p = p * keep
    p[torch.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p @ w, p.T @ h


def timed(fn, repeats):
    return statistics.median(time_step(fn, "cpu", repeats))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/bpe8k/checkpoint.pt")
    ap.add_argument("--windows", type=int, default=16, help="validation windows of --seq tokens")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--thresholds", type=float, nargs="+",
                    default=[2.0 ** -12, 2.0 ** -16, 2.0 ** -20, 2.0 ** -24])
    ap.add_argument("--dump", default=None, help="save the hidden states and labels here")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    try:
        model, ckpt = load_model(a.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # a refused or unreadable checkpoint
        ap.error(str(e))
    model.eval()
    tok = tokenizers.from_dict(ckpt.get("tokenizer"))
    train_files, val_files, what = load_corpus_files(ckpt["args"].get("data"))
    val, train = tok.encode_corpus(val_files), tok.encode_corpus(train_files)
    x = torch.cat(eval_batches(val, a.windows, 1, min(a.seq, model.cfg.max_seq_len))).long()
    n = model.cfg.n_future
    with torch.no_grad():
        xs, cos, sin = model.trunk_forward(x)
        hidden = torch.stack([model.head_forward(k, xs, cos, sin) for k in range(n)])
    L = x.shape[1] - n  # positions where every head has a label: head k at t predicts t + k + 1
    hidden = hidden[:, :, :L].reshape(n, -1, hidden.shape[-1])                  # [n, rows, D]
    labels = torch.stack([x[:, k + 1:k + 1 + L].reshape(-1) for k in range(n)])  # [n, rows]
    rows = labels.shape[1]
    w = model.unembedding.detach()
    if a.dump:
        torch.save({"hidden": hidden, "labels": labels, "weight": w}, a.dump)
    V = w.shape[0]
    freq = torch.bincount(train.long(), minlength=V)
    print(f"checkpoint {a.checkpoint} ({tokenizers.describe(tok)}); {rows} held-out rows per "
          f"head ({what})")
    print("| head | threshold | entries kept | dropped mass per row (mean / max) | kept blocks, own "
          "order: 64x64 | by frequency: 64x64, 256x64, 256x256 | dX error, filtered / dense bf16 "
          "| dW error, filtered / dense bf16 |")
    print("|---|---:|---:|---|---:|---|---|---|")
    order = freq.argsort(descending=True)
    for k in range(n):
        h, y = hidden[k], labels[k]
        p = (h.double() @ w.double().T).softmax(-1)
        ref = grads(h, w, y)
        hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        mtp_ext.linear_cross_entropy(hb, wb, y).backward()
        dense = [rel_err(d, r) for d, r in zip((hb.grad, wb.grad), ref)]
        for thr in a.thresholds:
            keep = p >= thr
            dropped = (p * ~keep).sum(1)
            filt = [rel_err(f, r) for f, r in zip(grads(h, w, y, keep), ref)]

            def blocks(perm, R, B):
                b = keep[:, perm][: rows // R * R]
                return float(b.reshape(rows // R, R, V // B, B).any(3).any(1).float().mean())

            own = blocks(torch.arange(V), 64, 64)
            by_freq = " ".join(f"{blocks(order, R, B):.2f}" for R, B in ((64, 64), (256, 64), (256, 256)))
            print(f"| {k} | 2^{math.log2(thr):.0f} | {keep.float().mean():.3f} | {dropped.mean():.2e} / "
                  f"{dropped.max():.2e} | {own:.2f} | {by_freq} | {filt[0]:.1e} / {dense[0]:.1e} "
                  f"({filt[0] / dense[0]:.2f}x) | {filt[1]:.1e} / {dense[1]:.1e} ({filt[1] / dense[1]:.2f}x) |")
    # dense bf16 fused forward + backward against its GEMM floor
    hb = hidden.bfloat16()
    wb = w.bfloat16()

    def fused():
        hh, ww = hb.clone().requires_grad_(), wb.clone().requires_grad_()
        mtp_ext.mtp_loss(hh, ww, labels, shift=False).loss.backward()

    def floor():
        for k in range(n):
            z = hb[k] @ wb.T
            z @ wb
            z.T @ hb[k]

    tf, tg = timed(fused, a.repeats), timed(floor, a.repeats)
    print(f"dense bf16 fused forward + backward, n = {n}, {rows} rows per head, V = {V}, "
          f"D = {w.shape[1]}: {tf * 1e3:.0f} ms = {tf / tg:.2f}x the 3-GEMM floor ({tg * 1e3:.0f} ms); "
          f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
