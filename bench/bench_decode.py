"""Plain greedy vs greedy self-speculative decoding (one draft per head, a tree of candidates,
and what the cost model picks) on a `mtp-ext train` checkpoint, over held-out prompts: windows
of the validation split of the Python standard library's sources (the draft statistics are
calibrated on the training split).

    python bench/bench_decode.py --checkpoint runs/mtp/checkpoint.pt [--prompts 16] [--new 128]
    python bench/bench_decode.py --curve-only --d-model 768 --layers 8   # a random-init model

Prints tokens per forward, per-head acceptance and wall-clock time of each mode (batch 1, and
batched runs where each sequence advances by its own accepted run, interleaved, medians), what
the cost model picked and why (expected and measured tokens per second), checks that every
mode produces the tokens of plain decoding, breaks a decoding step's time down, and plots the
step time against the tokens verified at batch 1 and 8 (--plot)."""
import argparse
import statistics
import sys
import time

import torch

from mtp_ext.decoding import cost_model
from mtp_ext.decoding.generate import DRAFT_TREE_NODES, DraftTree, chain
from mtp_ext.model import MTPConfig, MTPTransformer
from mtp_ext.training import tokenizer as tokenizers
from mtp_ext.benchmark import time_step
from mtp_ext.training.distributed import DEVICES, pick_device
from mtp_ext.training.train import calibrate_draft_tree, eval_batches, load_corpus_files, load_model


@torch.no_grad()
def step_costs(model, prompt, tree, repeats: int = 50):
    """Median milliseconds of the parts of a decoding step after the prompt: a plain step (1
    token, trunk and head 0), the verification of a tree of candidates (trunk and head 0), the
    draft heads on a kept path of 1 and n tokens, and a blockwise step of n tokens through every
    head (speculative sampling's step)."""
    n, dev = model.cfg.n_future, prompt.device
    caches = model.new_caches(1)
    model.forward_cached(prompt[None], caches)
    pos = torch.tensor([prompt.numel()], device=dev)
    toks = prompt.repeat(len(tree) // prompt.numel() + 1)[None, :len(tree) + 1]
    x = torch.randn(1, n, model.cfg.d_model, dtype=model.embed.weight.dtype, device=dev)
    tree = tree.to(dev)
    parts = {"plain step: 1 token, trunk + head 0":
             lambda: model.forward_cached(toks[:, :1], caches, 1, positions=pos),
             f"tree verification: {len(tree) + 1} tokens, trunk + head 0":
             lambda: model.forward_tree(toks, caches, pos, tree.depth, tree.visible),
             "draft heads on a kept path of 1 token": lambda: model.draft_forward(x[:, :1], caches, pos),
             f"draft heads on a kept path of {n} tokens": lambda: model.draft_forward(x, caches, pos),
             f"blockwise step: {n} tokens, trunk + {n} heads":
             lambda: model.forward_cached(toks[:, :n], caches, n, positions=pos)}
    return {name: statistics.median(time_step(f, dev.type, repeats)) * 1e3
            for name, f in parts.items()}


@torch.no_grad()
def linear_costs(model, rows=(1, 4, 25), repeats: int = 200):
    """Median microseconds of one decoding product (the MLP's gate/up weight) for a few rows:
    ATen's F.linear against the oneDNN-prepacked product of cached decoding."""
    from mtp_ext.decoding.packed_linear import available, linear, packed_linears
    w = model.trunk[0].mlp.gate_up.weight
    out = {}
    for r in rows:
        x = torch.randn(r, w.shape[1], dtype=w.dtype, device=w.device)
        for name, ctx in (("aten", False), ("prepacked", True)):
            if ctx and (not available() or w.device.type != "cpu"):
                continue
            with packed_linears(ctx):
                times = time_step(lambda: linear(x, w), w.device.type, repeats)
            out[(r, name)] = statistics.median(times) * 1e6
    return w, out


def step_curve(model, batches=(1, 8), sizes=(1, 3, 7, 15, 24, 32, 48), plot=None):
    """Step time against tokens verified (K = tree nodes + 1), plain steps at K = 1: measured
    with the cost model's timing (real steps on random prompts); printed, and plotted to plot."""
    n = model.cfg.n_future
    paths = [(r,) for r in range(48)] if n == 2 else (
        [(r,) for r in range(24)] + [(0, r) for r in range(24)])  # any prefix-closed tree
    sizes = [m for m in sizes if m <= min(len(paths), cost_model.timing_room(model))]
    t = cost_model.measure_step_times(model, list(batches), sizes, paths)
    print("step time (ms) against tokens verified per sequence, median of "
          f"{cost_model.TIMED_STEPS} steps (K = 1: a plain step):")
    print("| batch | " + " | ".join(["K = 1"] + [f"K = {m + 1}" for m in sizes])
          + " | K = 25 / plain |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    for B in batches:
        row = [t.plain[B]] + [t.tree[B][m + 1] for m in sizes]
        ratio = t.tree[B][25] / t.plain[B] if 25 in t.tree[B] else float("nan")
        print(f"| {B} | " + " | ".join(f"{x * 1e3:.2f}" for x in row) + f" | {ratio:.2f} |")
    if plot:
        from mtp_ext.experiments.plot import Panel, svg
        series = {f"batch {B}": ([1] + [m + 1 for m in sizes],
                                 [t.plain[B] * 1e3] + [t.tree[B][m + 1] * 1e3 for m in sizes])
                  for B in batches}
        svg(plot, [Panel(f"{model.num_parameters() / 1e6:.1f}M parameters, "
                         f"{model.embed.weight.dtype}".replace("torch.", ""),
                         "tokens verified per sequence (K)", "ms per step", series, ymin=0.0)])
        print(f"plot: {plot}")
    return t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/mtp/checkpoint.pt")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched run")
    ap.add_argument("--tree-nodes", type=int, default=None,
                    help="calibrate a tree of this many candidates on the training split "
                    f"(default: the checkpoint's tree, else {DRAFT_TREE_NODES})")
    ap.add_argument("--device", default="auto", choices=DEVICES)
    ap.add_argument("--repeats", type=int, default=3,
                    help="batched runs of each mode, interleaved (medians)")
    ap.add_argument("--plot", default=None, help="SVG of step time against tokens verified")
    ap.add_argument("--curve-only", action="store_true",
                    help="only the step-time curve, of a random-init model of --d-model, "
                    "--layers (trunk), --n-future, byte vocabulary (no checkpoint)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--n-future", type=int, default=4)
    a = ap.parse_args(argv)
    if a.curve_only:
        torch.manual_seed(0)
        model = MTPTransformer(MTPConfig(d_model=a.d_model, n_layers=a.layers,
                                         n_heads=max(1, a.d_model // 64),
                                         n_future=a.n_future)).to(pick_device(a.device)).eval()
        print(f"random-init model: d_model {a.d_model}, {a.layers} trunk layers, n = "
              f"{a.n_future} heads, {model.num_parameters() / 1e6:.1f}M parameters "
              f"({model.num_parameters() * 4 / 2 ** 20:.0f} MiB in fp32); "
              f"{torch.get_num_threads()} threads")
        step_curve(model, plot=a.plot)
        return 0
    try:
        device = pick_device(a.device)
        model, ckpt = load_model(a.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # a refused or unreadable checkpoint
        ap.error(str(e))
    model.to(device).eval()
    torch.manual_seed(0)
    tok = tokenizers.from_dict(ckpt.get("tokenizer"))
    train_files, val_files, what = load_corpus_files(ckpt["args"].get("data"))
    train, val = tok.encode_corpus(train_files), tok.encode_corpus(val_files)
    if a.tree_nodes is not None or model.draft_stats is None:
        t = time.perf_counter()
        model.draft_tree, model.draft_stats = calibrate_draft_tree(
            model, train, a.tree_nodes or DRAFT_TREE_NODES)
        print(f"draft statistics calibrated on the training split in "
              f"{time.perf_counter() - t:.1f} s")
    tree = DraftTree(model.draft_tree, model.cfg.n_future)
    modes = {"plain": dict(), "speculative, chain": dict(speculative=True, tree=chain(model.cfg.n_future)),
             f"speculative, tree of {len(tree)}": dict(speculative=True, tree=tree),
             "speculative, planned": dict(speculative=True)}
    prompts = torch.cat(eval_batches(val, a.prompts, 1, a.prompt_len)).to(device)  # [P, len]
    print(f"checkpoint {a.checkpoint}: n = {model.cfg.n_future} heads, "
          f"{model.num_parameters() / 1e6:.2f}M parameters; {a.prompts} validation prompts of "
          f"{a.prompt_len} tokens ({what}; {tokenizers.describe(tok)}), {a.new} new tokens each; "
          + (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads"))
    print(f"tree: {tree.paths}")
    rows = {mode: [] for mode in modes}
    for p in prompts:
        outs = {}
        for mode, kw in modes.items():
            model.generate(p[None, :8], 4, **kw)  # warm
            outs[mode] = model.generate(p[None], a.new, **kw)
            rows[mode].append(outs[mode])
            if not torch.equal(outs["plain"].tokens, outs[mode].tokens):
                print(f"MISMATCH between plain and {mode} output", file=sys.stderr)
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
        accs = " ".join(f"{x:.2f}" for x in acc) if mode != "plain" else ""
        print(f"| {mode} | {tpf:.2f} | {med:.2f} | {wall:.2f} | {sp:.2f}x | {accs} |")
    planned = rows["speculative, planned"]
    picks = sorted({o.plan.summary().split(" at batch")[0] for o in planned})
    print(f"planned, batch 1: picked {', '.join(picks)}; {planned[0].plan.why[1]}; expected "
          f"{statistics.median(o.plan.expected_tokens_per_second for o in planned):.0f} tokens/s "
          f"(median over prompts), measured "
          f"{sum(o.new_tokens for o in planned) / res['speculative, planned'][1]:.0f}")
    # batched: each sequence advances by its own accepted run; modes interleaved, medians
    bp = prompts[: a.batch]
    for mode, kw in modes.items():
        model.generate(bp[:, :8], 4, **kw)  # warm (and the planned mode's step timing)
    runs = {mode: [] for mode in modes}
    for _ in range(a.repeats):
        for mode, kw in modes.items():
            runs[mode].append(model.generate(bp, a.new, **kw))
    same = all(torch.equal(runs["plain"][0].tokens, o.tokens) for rs in runs.values() for o in rs)
    wall = {mode: statistics.median(o.wall_seconds for o in rs) for mode, rs in runs.items()}
    print(f"batch {a.batch}, median of {a.repeats} interleaved runs (outputs identical per "
          f"sequence: {same}): plain {wall['plain']:.2f} s; " + "; ".join(
              f"{mode} {wall[mode]:.2f} s ({wall['plain'] / wall[mode]:.2f}x), "
              f"{rs[0].tokens_per_forward:.2f} tokens per forward per sequence"
              for mode, rs in runs.items() if mode != "plain"))
    o = runs["speculative, planned"][0]
    print(f"planned, batch {a.batch}: {o.plan.summary()}; {o.plan.why[a.batch]}; expected "
          f"{o.plan.expected_tokens_per_second:.0f} tokens/s, measured "
          f"{a.batch * a.new / wall['speculative, planned']:.0f}")
    print("step parts, median of 50 cached forwards after a prompt (ms):")
    for name, ms in step_costs(model, prompts[0], tree).items():
        print(f"  {name}: {ms:.2f}")
    w, lin = linear_costs(model)
    print(f"one product by a {list(w.shape)} {w.dtype} weight, median (us): " + "; ".join(
        f"{r} rows {name} {us:.0f}" for (r, name), us in lin.items()))
    step_curve(model, batches=(1, a.batch), plot=a.plot)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
