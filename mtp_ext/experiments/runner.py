"""`mtp-ext experiment polynomial`: the reference model trained with n = 1, 2, 4 heads on an
algorithmic task, several seeds, head 0's greedy exact match per difficulty on held-out
prompts, at equal steps and at equal training compute; the table written into
docs/experiments.md (its own section, replaced on each run, with the command, machine and
commit)."""
from __future__ import annotations

import math
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..model import MTPConfig, MTPTransformer
from . import polynomial as task

IGNORE = -100


def make_batch(rng: random.Random, ms: Sequence[int], size: int, length: int):
    """size training sequences (inputs, labels [size, length]): labels on the answer only."""
    x = torch.full((size, length), task.BOS, dtype=torch.long)
    y = torch.full((size, length), IGNORE, dtype=torch.long)
    for b in range(size):
        prompt, answer = task.sample(rng, rng.choice(list(ms)), test=False)
        seq = prompt + answer
        x[b, :len(seq)] = torch.tensor(seq)
        y[b, len(prompt):len(seq)] = torch.tensor(answer)
    return x, y


def test_set(m: int, count: int):
    """The held-out prompts of difficulty m (the same for every run): padded [count, P], lengths,
    answers [count, 5]."""
    rng = random.Random(1_000_003 * m)
    rows = [task.sample(rng, m, test=True) for _ in range(count)]
    P = max(len(p) for p, _ in rows)
    prompts = torch.full((count, P), task.BOS, dtype=torch.long)
    for i, (p, _) in enumerate(rows):
        prompts[i, :len(p)] = torch.tensor(p)
    return prompts, [len(p) for p, _ in rows], torch.tensor([a for _, a in rows])


@torch.no_grad()
def exact_match(model: MTPTransformer, m: int, count: int, batch: int = 250) -> float:
    prompts, lens, answers = test_set(m, count)
    hits = 0
    for i in range(0, count, batch):
        p, L = prompts[i:i + batch], lens[i:i + batch]
        out = model.generate(p, task.ANSWER, prompt_lengths=L).tokens
        got = torch.stack([out[j, l:l + task.ANSWER] for j, l in enumerate(L)])
        hits += int((got == answers[i:i + batch]).all(1).sum())
    return hits / count


def config(n: int, d_model: int, layers: int, max_m: int) -> MTPConfig:
    return MTPConfig(vocab_size=task.VOCAB, d_model=d_model, n_layers=layers, n_heads=4,
                     n_future=n, max_seq_len=task.max_len(max_m) + 8)


def step_flops(cfg: MTPConfig) -> float:
    """Training FLOPs per token, 6 x the weights a token passes through: the trunk, n head
    layers and n unembeddings (attention's own products left out: short sequences)."""
    model = MTPTransformer(cfg)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    head = sum(p.numel() for p in model.heads[0].parameters())
    return 6.0 * (trunk + cfg.n_future * (head + cfg.vocab_size * cfg.d_model))


def train_one(n: int, seed: int, steps: int, *, d_model: int, layers: int, lr: float,
              batch: int, train_ms: Sequence[int], max_m: int, log) -> MTPTransformer:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = config(n, d_model, layers, max_m)
    model = MTPTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    length = task.max_len(max(train_ms))
    t0 = time.perf_counter()
    for step in range(steps):
        frac = min(1.0, max(0, step - warmup) / max(1, steps - warmup))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        x, y = make_batch(rng, train_ms, batch, length)
        loss = model(x, y).loss.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"  n={n} seed {seed}: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    return model.eval()


def run(steps: int = 1000, seeds: Sequence[int] = (0, 1, 2), heads: Sequence[int] = (1, 2, 4),
        equal_compute: bool = True, d_model: int = 128, layers: int = 2, lr: float = 2e-3,
        batch: int = 128, train_ms: Sequence[int] = (1, 2, 3, 4, 5),
        test_ms: Sequence[int] = (1, 2, 3, 4, 5, 6, 7), test_count: int = 500,
        log=print) -> dict:
    """Every (n, seed) at `steps`, and with equal_compute n = 1 at the steps that cost the
    FLOPs of max(heads) at `steps`. Returns {"rows": {label: {m: [acc per seed]}}, ...}."""
    max_m = max(max(train_ms), max(test_ms))
    runs = [(f"n={n}, {steps} steps", n, steps) for n in heads]
    if equal_compute and max(heads) > 1:
        top = max(heads)
        ratio = step_flops(config(top, d_model, layers, max_m)) / step_flops(
            config(1, d_model, layers, max_m))
        runs.append((f"n=1, {round(steps * ratio)} steps (the FLOPs of n={top})", 1,
                     round(steps * ratio)))
    rows: Dict[str, Dict[int, List[float]]] = {}
    seconds: Dict[str, List[float]] = {}
    t_all = time.perf_counter()
    for i, (label, n, s) in enumerate(runs):
        for seed in seeds:
            log(f"[{i * len(seeds) + list(seeds).index(seed) + 1}/{len(runs) * len(seeds)}] "
                f"{label}, seed {seed}")
            t0 = time.perf_counter()
            model = train_one(n, seed, s, d_model=d_model, layers=layers, lr=lr, batch=batch,
                              train_ms=train_ms, max_m=max_m, log=log)
            seconds.setdefault(label, []).append(time.perf_counter() - t0)
            for m in test_ms:
                rows.setdefault(label, {}).setdefault(m, []).append(
                    exact_match(model, m, test_count))
            log("  exact match " + "  ".join(f"m={m}: {rows[label][m][-1]:.3f}"
                                              for m in test_ms))
    return {"rows": rows, "seconds": seconds, "total_seconds": time.perf_counter() - t_all,
            "train_ms": list(train_ms), "test_ms": list(test_ms), "seeds": list(seeds),
            "settings": dict(steps=steps, d_model=d_model, layers=layers, lr=lr, batch=batch,
                             test_count=test_count)}


def table(result: dict) -> str:
    ms, train_ms = result["test_ms"], set(result["train_ms"])
    head = "| run | " + " | ".join(f"m={m}{'' if m in train_ms else ' (out of domain)'}"
                                    for m in ms) + " | train s / run |"
    lines = [head, "|---|" + "---:|" * (len(ms) + 1)]
    for label, accs in result["rows"].items():
        cells = []
        for m in ms:
            v = accs[m]
            spread = f" ({min(v) * 100:.1f}-{max(v) * 100:.1f})" if len(v) > 1 else ""
            cells.append(f"{statistics.mean(v) * 100:.1f}{spread}")
        secs = statistics.mean(result["seconds"][label])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def write_section(path: str, name: str, text: str) -> None:
    """Replaces the section between <!-- name --> and <!-- /name --> of path (appends it)."""
    p = Path(path)
    body = p.read_text() if p.exists() else "# Experiments\n\nWritten by `mtp-ext experiment`; never edited by hand.\n"
    block = f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else body.rstrip() + "\n\n" + block + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body if body.endswith("\n") else body + "\n")


def report(result: dict, command: str, machine: str, commit: str, date: str) -> str:
    s = result["settings"]
    return (f"## Polynomial arithmetic\n\n{task.describe().capitalize()}. Trained on m in "
            f"{result['train_ms']} (uniform), tested on {s['test_count']} held-out prompts per "
            f"m (never in training); head 0's greedy decoding, exact match in %, mean over "
            f"seeds {result['seeds']} (min-max). Reference model: d_model {s['d_model']}, "
            f"{s['layers']} trunk layers, one layer per head, AdamW lr {s['lr']}, batch "
            f"{s['batch']}, labels on the answer only. Equal compute: n = 1 for the steps whose "
            f"training FLOPs (6 x weights per token) are those of the largest n.\n\n"
            f"`{command}` ({date}, commit {commit}; {machine}; "
            f"{result['total_seconds'] / 60:.0f} min in all)\n\n{table(result)}\n")


def main(args) -> int:
    from ..cli import _commit, _machine
    import datetime
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    result = run(steps=args.steps, seeds=list(range(args.seeds)), heads=args.heads,
                 equal_compute=not args.no_equal_compute, test_count=args.test_count, log=log)
    text = report(result, "mtp-ext " + " ".join(args.argv), _machine(), _commit(),
                  datetime.date.today().isoformat())
    print(table(result))
    if args.out:
        write_section(args.out, "polynomial", text)
        print(f"wrote {args.out}")
    return 0
