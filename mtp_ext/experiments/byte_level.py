"""`mtp-ext experiment bytes`: the paper's byte-level claim on the main job's corpus. The main
job (`mtp-ext train`, its defaults: the Python standard library's sources as bytes) run with
n = 1 and n = 4 heads, same trunk, same seed; head 0's validation loss (next-byte
cross-entropy) against steps and against training time, in a table and one plot. Runs are kept
as records (experiments/bytes-runs.jsonl beside --out), as for the other experiments."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from .runner import load_records, write_section


class Task:
    name, title = "bytes", "Byte-level next-token loss on the main job's corpus"
    steps, heads, seeds = 300, [1, 4], 1
    eval_every = 25


def train_args(n: int, seed: int, steps: int, out: str):
    from ..training.train import TrainArgs
    return TrainArgs(n_future=n, seed=seed, steps=steps, eval_every=Task.eval_every,
                     save_every="0", out=out, overwrite=True)


def run_key(n: int, seed: int, steps: int) -> str:
    from dataclasses import asdict
    a = asdict(train_args(n, seed, steps, ""))
    a.pop("out")
    return json.dumps(dict(task=Task.name, **a), sort_keys=True)


def run(heads: List[int], seeds: List[int], steps: int, records: Optional[Path], stamp: dict,
        log) -> List[dict]:
    from ..training.train import train
    done = load_records(records)
    recs = []
    for n in heads:
        for seed in seeds:
            key = run_key(n, seed, steps)
            if key in done:
                recs.append(done[key])
                continue
            log(f"mtp-ext train --n-future {n} --seed {seed} --steps {steps} "
                f"--eval-every {Task.eval_every}")
            with tempfile.TemporaryDirectory() as tmp:
                summary = train(train_args(n, seed, steps, tmp), log=log)
            curve = [dict(step=h["step"], seconds=h["train_seconds"], loss=h["val_losses"][0])
                     for h in summary["history"]]
            rec = dict(key=key, n=n, seed=seed, steps=steps, curve=curve,
                       train_seconds=round(summary["train_seconds"], 1),
                       val_losses=summary["val_losses"], **stamp)
            if records is not None:
                records.parent.mkdir(parents=True, exist_ok=True)
                with records.open("a") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
            recs.append(rec)
    return recs


def mean_curves(recs: List[dict]) -> Dict[int, List[dict]]:
    """Per n: at each evaluated step, head 0's loss and the training seconds, mean over seeds."""
    out: Dict[int, List[dict]] = {}
    for n in dict.fromkeys(r["n"] for r in recs):
        runs = [r["curve"] for r in recs if r["n"] == n]
        out[n] = [dict(step=pts[0]["step"], seconds=statistics.mean(p["seconds"] for p in pts),
                       loss=statistics.mean(p["loss"] for p in pts)) for pts in zip(*runs)]
    return out


def table(recs: List[dict]) -> str:
    curves = mean_curves(recs)
    ns = list(curves)
    lines = ["| step | " + " | ".join(f"n={n}: head-0 loss | n={n}: train s" for n in ns) + " |",
             "|---:|" + "---:|---:|" * len(ns)]
    for row in zip(*curves.values()):
        lines.append(f"| {row[0]['step']} | " + " | ".join(
            f"{p['loss']:.3f} | {p['seconds']:.0f}" for p in row) + " |")
    return "\n".join(lines)


def plot(recs: List[dict], path: Path) -> None:
    from .plot import Panel, svg
    curves = mean_curves(recs)
    by = lambda x: {f"n={n}": ([p[x] for p in c], [p["loss"] for p in c]) for n, c in curves.items()}
    svg(path, [Panel("head-0 validation loss against steps", "step", "loss (nats per byte)", by("step")),
               Panel("against training time", "seconds of training", "loss (nats per byte)",
                     by("seconds"))])


def report(recs: List[dict], command: str, figure: str) -> str:
    stamps = sorted({(r["date"], r["commit"], r["machine"]) for r in recs})
    made = "; ".join(f"{d}, commit {c}, {m}" for d, c, m in stamps)
    seeds = sorted({r["seed"] for r in recs})
    return (f"## {Task.title}\n\n`mtp-ext train` with its defaults (the Python standard "
            f"library's sources as bytes) and `--n-future` 1 or 4, evaluated every "
            f"{Task.eval_every} steps: head 0's validation loss (next byte, nats) against steps "
            f"and against the seconds of training before that evaluation (evaluations and "
            f"checkpoints left out); mean over seeds {seeds}.\n\n`{command}` (runs made on: "
            f"{made})\n\n{table(recs)}\n\n![{Task.title}]({figure})\n")


def main(args) -> int:
    import datetime
    import sys
    from ..cli import _commit, _machine
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.sizes or args.layers:
        raise ValueError("mtp-ext experiment bytes: --sizes and --layers do not apply (the main "
                         "job's model)")
    records = Path(args.runs) if args.runs else (
        Path(args.out).parent / "experiments" / "bytes-runs.jsonl" if args.out else None)
    stamp = dict(machine=_machine(), commit=_commit(), date=datetime.date.today().isoformat())
    recs = run(args.heads or Task.heads, list(range(args.seeds or Task.seeds)),
               args.steps or Task.steps, records, stamp, log)
    print(table(recs))
    if args.out:
        figure = Path(args.out).parent / "experiments" / "bytes.svg"
        plot(recs, figure)
        write_section(args.out, Task.name, report(
            recs, "mtp-ext " + " ".join(args.argv), figure.relative_to(Path(args.out).parent).as_posix()))
        print(f"wrote {args.out}, {figure}")
    return 0
