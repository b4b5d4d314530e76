"""Plain greedy vs greedy self-speculative decoding on a `mtp-ext train` checkpoint, over
held-out prompts: windows of the validation split of the Python standard library's sources.

    python bench/bench_decode.py --checkpoint runs/mtp/checkpoint.pt [--prompts 16] [--new 128]

Prints tokens per forward, per-head acceptance and wall-clock time of both modes (batch 1, and
one batched run where each sequence advances by its own accepted run), checks that both modes
produce the same tokens, and breaks a decoding step's time down (cached forwards of 1 and n
tokens through the trunk and head 0, and through every head)."""
import argparse
import statistics
import sys
import time

import torch

from mtp_ext.train import eval_batches, load_corpus, load_model


@torch.no_grad()
def step_costs(model, prompt, repeats: int = 50):
    """Median milliseconds of cached forwards after the prompt: a plain step (1 token, trunk and
    head 0), n tokens through the trunk and head 0, and a speculative step (n tokens, every
    head)."""
    n = model.cfg.n_future
    caches = model.new_caches(1)
    model.forward_cached(prompt[None], caches)
    start = caches[0].length
    ids = prompt[None, :n]
    out = {}
    for name, T, heads in (("plain step: 1 token, trunk + head 0", 1, 1),
                           (f"{n} tokens, trunk + head 0", n, 1),
                           (f"speculative step: {n} tokens, trunk + {n} heads", n, n)):
        times = []
        for _ in range(repeats):
            for c in caches:
                c.truncate(start)
            t = time.perf_counter()
            model.forward_cached(ids[:, :T], caches, heads)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/mtp/checkpoint.pt")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched run")
    a = ap.parse_args(argv)
    model, ckpt = load_model(a.checkpoint)
    model.eval()
    torch.manual_seed(0)
    _, val, what = load_corpus(ckpt["args"].get("data"))
    prompts = torch.cat(eval_batches(val, a.prompts, 1, a.prompt_len))  # [P, prompt_len]
    print(f"checkpoint {a.checkpoint}: n = {model.cfg.n_future} heads, "
          f"{model.num_parameters() / 1e6:.2f}M parameters; {a.prompts} validation prompts of "
          f"{a.prompt_len} bytes ({what}), {a.new} new tokens each; {torch.get_num_threads()} threads")
    rows = {"plain": [], "speculative": []}
    for p in prompts:
        outs = {}
        for mode in ("plain", "speculative"):
            model.generate(p[None, :8], 4, speculative=mode == "speculative")  # warm
            outs[mode] = model.generate(p[None], a.new, speculative=mode == "speculative")
            rows[mode].append(outs[mode])
        if not torch.equal(outs["plain"].tokens, outs["speculative"].tokens):
            print("MISMATCH between plain and speculative output", file=sys.stderr)
            return 1
    res = {}
    for mode, outs in rows.items():
        tok = sum(o.new_tokens for o in outs)
        fw = sum(o.forward_passes for o in outs)
        wall = sum(o.wall_seconds for o in outs)
        prop = [sum(o.head_proposed[k] for o in outs) for k in range(model.cfg.n_future - 1)]
        acc = [sum(o.head_accepted[k] for o in outs) for k in range(model.cfg.n_future - 1)]
        res[mode] = (tok / fw, wall, [x / y if y else float("nan") for x, y in zip(acc, prop)],
                     statistics.median(o.tokens_per_forward for o in outs))
    print("| mode | tokens / forward (all prompts) | median per prompt | wall time (s) | "
          "speedup | head acceptance (1..n-1) |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, (tpf, wall, acc, med) in res.items():
        sp = res["plain"][1] / wall
        accs = " ".join(f"{x:.2f}" for x in acc) if mode == "speculative" else ""
        print(f"| {mode} | {tpf:.2f} | {med:.2f} | {wall:.2f} | {sp:.2f}x | {accs} |")
    # batched: each sequence advances by its own accepted run
    bp = prompts[: a.batch]
    t = {}
    for mode in ("plain", "speculative"):
        model.generate(bp[:, :8], 4, speculative=mode == "speculative")  # warm
        t[mode] = model.generate(bp, a.new, speculative=mode == "speculative")
    same = torch.equal(t["plain"].tokens, t["speculative"].tokens)
    print(f"batch {a.batch}: plain {t['plain'].wall_seconds:.2f} s, speculative "
          f"{t['speculative'].wall_seconds:.2f} s ({t['plain'].wall_seconds / t['speculative'].wall_seconds:.2f}x), "
          f"{t['speculative'].tokens_per_forward:.2f} tokens per forward per sequence, "
          f"outputs identical: {same}")
    print("step time, median of 50 cached forwards after a prompt (ms):")
    for name, ms in step_costs(model, prompts[0]).items():
        print(f"  {name}: {ms:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
