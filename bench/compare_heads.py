"""Parallel heads against sequential MTP modules: two `mtp-ext train` checkpoints (e.g. the
defaults, and the same with --head-style sequential), their per-head validation losses (from
each run's summary.json) and greedy self-speculative decoding of held-out prompts (windows of
the validation split) with one chain of drafts, batch 1: tokens per forward, per-depth
acceptance, time against plain greedy decoding, and the check that the tokens are plain
decoding's.

    python bench/compare_heads.py runs/par/checkpoint.pt runs/seq/checkpoint.pt [--prompts 8] [--new 96]
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from mtp_ext.decoding.generate import chain
from mtp_ext.training import tokenizer as tokenizers
from mtp_ext.training.train import eval_batches, load_corpus_files, load_model


@torch.no_grad()
def decode(model, prompts, new: int):
    tree = None if model.sequential else chain(model.cfg.n_future)
    rows = {"tpf": [], "speedup": []}
    acc_p, acc_a = [0] * (model.cfg.n_future - 1), [0] * (model.cfg.n_future - 1)
    model.generate(prompts[:1], 4, speculative=True, tree=tree)  # warm
    for p in prompts:
        p = p[None]
        plain = model.generate(p, new)
        spec = model.generate(p, new, speculative=True, tree=tree)
        if not torch.equal(plain.tokens, spec.tokens):
            raise SystemExit("speculative decoding differs from plain decoding")
        rows["tpf"].append(spec.tokens_per_forward)
        rows["speedup"].append(plain.wall_seconds / spec.wall_seconds)
        acc_p = [a + b for a, b in zip(acc_p, spec.head_proposed)]
        acc_a = [a + b for a, b in zip(acc_a, spec.head_accepted)]
    return (statistics.mean(rows["tpf"]), statistics.median(rows["speedup"]),
            [a / p if p else float("nan") for a, p in zip(acc_a, acc_p)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=96)
    a = ap.parse_args()
    print("| checkpoint | heads | val loss per head | train s | tokens / forward | "
          "acceptance per depth | speedup over plain |")
    print("|---|---|---|---:|---:|---|---:|")
    for path in a.checkpoints:
        model, ckpt = load_model(path)
        model.eval()
        tok = tokenizers.from_dict(ckpt.get("tokenizer"))
        val = tok.encode_corpus(load_corpus_files(ckpt["args"].get("data"))[1])
        prompts = torch.cat(eval_batches(val, a.prompts, 1, a.prompt_len))
        tpf, speed, acc = decode(model, prompts, a.new)
        summary = json.loads((Path(path).parent / "summary.json").read_text())
        print(f"| {path} | {model.cfg.n_future} {model.cfg.head_style} | "
              + " / ".join(f"{v:.3f}" for v in summary["val_losses"])
              + f" | {summary['train_seconds']:.0f} | {tpf:.2f} | "
              + " / ".join(f"{v:.2f}" for v in acc) + f" | {speed:.2f}x |")


if __name__ == "__main__":
    main()
