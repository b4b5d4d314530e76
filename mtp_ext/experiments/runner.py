"""`mtp-ext experiment TASK`: the reference model trained with n = 1, 2, 4 heads on an
algorithmic task (polynomial.py, induction.py), several seeds and model sizes, head 0 measured on
held-out data, at equal steps and at equal training FLOPs. Each finished run is appended to a
JSON-lines file of records (docs/experiments/TASK-runs.jsonl beside --out), so an interrupted
experiment resumes where it stopped and the report is rebuilt from the records; the table and
the plot go into docs/experiments.md (its own section, replaced on each run)."""
from __future__ import annotations

import json
import math
import random
import re
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..model import MTPConfig, MTPTransformer


RECIPES = {  # the optimizer and schedule of train_one
    "cosine": "AdamW lr {lr} (betas 0.9, 0.95, weight decay 0.1), 5% linear warmup then a "
              "cosine decay to 10%, gradients clipped at norm 1",
    "constant": "AdamW at torch's defaults (betas 0.9, 0.999, weight decay 0.01) and a "
                "constant lr {lr}, no clipping",
}


def config(task, n: int, d_model: int, layers: int) -> MTPConfig:
    return MTPConfig(vocab_size=task.vocab, d_model=d_model, n_layers=layers, n_heads=4,
                     n_future=n, max_seq_len=task.max_seq_len)


def token_flops(cfg: MTPConfig) -> float:
    """Training FLOPs per token, 6 x the weights a token passes through: the trunk, n head
    layers and n unembeddings (attention's own products left out: short sequences)."""
    model = MTPTransformer(cfg)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    head = sum(p.numel() for p in model.heads[0].parameters())
    return 6.0 * (trunk + cfg.n_future * (head + cfg.vocab_size * cfg.d_model))


def plan(task, steps: int, seeds: Sequence[int], heads: Sequence[int], sizes: Sequence[int],
         layers: int, equal_compute: bool) -> List[dict]:
    """The runs, most informative first (n = 1 and the largest n for every seed, then the other
    n, then n = 1 at the largest n's FLOPs), so a stopped experiment has its main comparison."""
    top = max(heads)
    groups: List[List[dict]] = [[], [], []]
    for d in sizes:
        size = f"d_model {d}, " if len(sizes) > 1 else ""
        for n in sorted(set(heads), key=lambda n: (n not in (1, top), n)):
            groups[0 if n in (1, top) else 1].append(
                dict(label=f"{size}n={n}, {steps} steps", group=f"n={n}", n=n, steps=steps,
                     d_model=d))
        if equal_compute and top > 1:
            ratio = token_flops(config(task, top, d, layers)) / token_flops(config(task, 1, d, layers))
            s = round(steps * ratio)
            groups[2].append(dict(label=f"{size}n=1, {s} steps (the FLOPs of n={top})",
                                  group=f"n=1, the FLOPs of n={top}", n=1, steps=s, d_model=d))
    return [dict(spec, seed=seed, layers=layers) for g in groups for seed in seeds for spec in g]


def train_one(task, run: dict, common: dict, log) -> MTPTransformer:
    n, seed, steps = run["n"], run["seed"], run["steps"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = MTPTransformer(config(task, n, run["d_model"], run["layers"]))
    lr, cosine = common["lr"], common["recipe"] == "cosine"
    if cosine:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    else:  # "constant": AdamW's defaults at a constant learning rate, no clipping
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    for step in range(steps):
        if cosine:
            frac = min(1.0, max(0, step - warmup) / max(1, steps - warmup))
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        x, y = task.batch(rng, common["batch"])
        loss = model(x, y).loss.loss
        loss.backward()
        if cosine:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"  {run['label']}, seed {seed}: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - t0:.0f} s")
    return model.eval()


def run_key(task, run: dict, common: dict) -> str:
    """What makes two runs the same: the task's settings, the model and the training."""
    what = dict(task=task.name, task_settings=task.settings(), **common,
                **{k: run[k] for k in ("n", "steps", "seed", "d_model", "layers")})
    return json.dumps(what, sort_keys=True)


def load_records(path: Optional[Path]) -> Dict[str, dict]:
    if path is None or not path.exists():
        return {}
    out = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                r = json.loads(line)
                out[r["key"]] = r
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}, line {i + 1}: not a run record ({e})") from None
    return out


def run(task, runs: List[dict], common: dict, records: Optional[Path], stamp: dict,
        log=print) -> List[dict]:
    """Every run of the plan, each read from `records` when it is there, else trained,
    measured and appended to it at once. Returns the plan's records in order."""
    done = load_records(records)
    out = []
    t_all = time.perf_counter()
    for i, r in enumerate(runs):
        key = run_key(task, r, common)
        if key in done:
            out.append(done[key])
            continue
        log(f"[{i + 1}/{len(runs)}] {r['label']}, seed {r['seed']} "
            f"({time.perf_counter() - t_all:.0f} s so far)")
        t0 = time.perf_counter()
        model = train_one(task, r, common, log)
        seconds = time.perf_counter() - t0
        acc = task.evaluate(model)
        log("  " + "  ".join(f"{name}: {acc[k]:.3f}" for k, name in task.columns()))
        rec = dict(key=key, label=r["label"], group=r["group"], seed=r["seed"], n=r["n"], steps=r["steps"],
                   d_model=r["d_model"], train_seconds=round(seconds, 1), acc=acc, **stamp)
        if records is not None:
            records.parent.mkdir(parents=True, exist_ok=True)
            with records.open("a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        out.append(rec)
        done[key] = rec
    return out


def summarize(task, recs: List[dict], cols=None) -> Dict[str, dict]:
    """Per label (in plan order): per column the accuracies over seeds, and train seconds;
    cols (default: the task's columns) the (key, name) pairs, records without them left out."""
    cols = cols or task.columns()
    rows: Dict[str, dict] = {}
    for r in recs:
        if not all(k in r["acc"] for k, _ in cols):
            continue
        row = rows.setdefault(r["label"], {"acc": {}, "seconds": [], "seeds": []})
        for k, _ in cols:
            row["acc"].setdefault(k, []).append(r["acc"][k])
        row["seconds"].append(r["train_seconds"])
        row["seeds"].append(r["seed"])
    return rows


def table(task, recs: List[dict], cols=None) -> str:
    cols = cols or task.columns()
    lines = ["| run | " + " | ".join(name for _, name in cols) + " | seeds | train s / run |",
             "|---|" + "---:|" * (len(cols) + 2)]
    for label, row in summarize(task, recs, cols).items():
        cells = []
        for k, _ in cols:
            v = row["acc"][k]
            spread = f" ({min(v) * 100:.1f}-{max(v) * 100:.1f})" if len(v) > 1 else ""
            cells.append(f"{statistics.mean(v) * 100:.1f}{spread}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(row['seeds'])} | "
                     f"{statistics.median(row['seconds']):.0f} |")
    return "\n".join(lines)


def tables(task, recs: List[dict]) -> str:
    """The main table, then the task's breakdown table where it has one (polynomial: m = 1 per
    operation) and some runs measured it."""
    out = table(task, recs)
    extra = task.breakdown(recs) if hasattr(task, "breakdown") else None
    if extra:
        heading, cols = extra
        out += f"\n\n{heading}:\n\n{table(task, recs, cols)}"
    return out


def plot(task, recs: List[dict], path: Path) -> None:
    """Mean over seeds with min-max bars, a line per run: against the task's columns
    (polynomial: difficulty), or, for a task with a plot_key, that column against model size
    (a line per n)."""
    from .plot import Panel, svg
    cols = task.columns()
    series = {}
    stat = lambda v: (statistics.mean(v) * 100, min(v) * 100, max(v) * 100)
    if getattr(task, "plot_key", None):
        sizes = sorted({r["d_model"] for r in recs})
        for group in dict.fromkeys(r["group"] for r in recs):
            pts = []
            for i, d in enumerate(sizes):
                v = [r["acc"][task.plot_key] for r in recs if r["group"] == group and r["d_model"] == d]
                if v:
                    pts.append((i, *stat(v)))
            series[group] = tuple(map(list, zip(*pts)))
        xticks = [str(d) for d in sizes]
    else:
        for label, row in summarize(task, recs).items():
            series[label] = tuple(map(list, zip(*[(i, *stat(row["acc"][k]))
                                                   for i, (k, _) in enumerate(cols)])))
        xticks = [name.replace(" (out of domain)", "*") for _, name in cols]
    svg(path, [Panel(task.plot_title, task.key_name, task.plot_ylabel, series, xticks=xticks,
                     ymin=0.0)])


def write_section(path: str, name: str, text: str) -> None:
    """Replaces the section between <!-- name --> and <!-- /name --> of path (appends it)."""
    p = Path(path)
    body = p.read_text() if p.exists() else "# Experiments\n\nWritten by `mtp-ext experiment`; never edited by hand.\n"
    block = f"<!-- {name} -->\n{text.rstrip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else body.rstrip() + "\n\n" + block + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body if body.endswith("\n") else body + "\n")


def report(task, recs: List[dict], common: dict, layers: int, command: str, figure: str) -> str:
    stamps = sorted({(r["date"], r["commit"], r["machine"]) for r in recs})
    made = "; ".join(f"{d}, commit {c}, {m}" for d, c, m in stamps)
    total = sum(r["train_seconds"] for r in recs) / 60
    fig = f"\n![{task.plot_title}]({figure})\n" if figure else ""
    recipe = RECIPES[common["recipe"]].format(lr=common["lr"])
    return (f"## {task.title}{getattr(task, 'subtitle', '')} ({common['recipe']} learning rate)\n\n{task.describe()} Mean over "
            f"seeds in % (min-max). Reference model: {layers} trunk layers, one layer per head; "
            f"batch {common['batch']}; {recipe}. Equal compute: n = 1 for the steps whose training FLOPs (6 x "
            f"weights per token) are those of the largest n. The train seconds are the "
            f"median over seeds of the training loop alone.\n\n"
            f"`{command}` ({total:.0f} min of training in all; runs made on: {made})\n\n"
            f"{tables(task, recs)}\n{fig}")


def make_task(args):
    if args.task == "polynomial":
        from .polynomial import Task
        if args.train_m:
            return Task(train_ms=sorted(set(args.train_m)), test_count=args.test_count)
        return Task(test_count=args.test_count)
    from .induction import Task
    return Task(test_count=args.test_count)


def main(args) -> int:
    import datetime
    import sys
    from ..cli import _commit, _machine
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.task == "bytes":
        from .byte_level import main as bytes_main
        return bytes_main(args)
    task = make_task(args)
    sizes = args.sizes or task.sizes
    layers = args.layers or task.layers
    common = dict(lr=task.lr, batch=task.batch_size, recipe=args.recipe)
    runs = plan(task, args.steps or task.steps, list(range(args.seeds or 3)), args.heads or task.heads,
                sizes, layers, not args.no_equal_compute)
    records = Path(args.runs) if args.runs else (
        Path(args.out).parent / "experiments" / f"{task.name}-runs.jsonl" if args.out else None)
    stamp = dict(machine=_machine(), commit=_commit(), date=datetime.date.today().isoformat())
    recs = run(task, runs, common, records, stamp, log=log)
    print(tables(task, recs))
    if args.out:  # a section (and plot) per recipe
        name = (task.name + getattr(task, "variant", "")
                + ("" if args.recipe == "cosine" else f"-{args.recipe}"))
        figure = Path(args.out).parent / "experiments" / f"{name}.svg"
        plot(task, recs, figure)
        rel = figure.relative_to(Path(args.out).parent).as_posix()
        write_section(args.out, name,
                      report(task, recs, common, layers, "mtp-ext " + " ".join(args.argv), rel))
        print(f"wrote {args.out}, {figure}" + (f" (records: {records})" if records else ""))
    return 0
