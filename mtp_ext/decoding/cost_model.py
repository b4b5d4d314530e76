"""What greedy speculative decoding verifies per step, chosen from a cost model: a tree of
candidates (a prefix of the calibrated, frequency-ordered rank paths), the chain (each draft
head's top token) or nothing (plain decoding), per batch size, as EAGLE-2 and SGLang shrink
their trees under load.

- Acceptance: the rank rows of greedy continuations of calibration texts (`draft_statistics`):
  per position, the rank (r1, ..., r_{n-1}) that draft head k gives the token greedy decoding
  produces k + 1 places ahead. A prefix-closed tree T keeps, per step, the longest prefix of
  the row at its position that is a path of T, and the next step starts after it: replaying
  that on each text gives its tokens per step exactly (`tokens_per_step`; not 1 + the sum of
  the paths' shares of positions, which overcounts where easy stretches, taken in few steps,
  alternate with hard ones). A batch decoded to a length takes the steps of its slowest
  sequence: at batch B, the expected steps per token are those of the slowest of B texts
  drawn at random (batch 1: the texts' tokens over their steps, a harmonic mean).
  Candidate trees: prefixes of the rank paths ordered by their share of positions.
- Cost: `StepTimes`, the median time of real decoding steps (generate.py's step functions on
  random prompts) verifying K tokens at batch B, on a grid of K and of B (powers of 2): in K the
  least-squares line through each batch size's points, linear between batch sizes; measured
  once per model configuration and machine, kept on the model and in a JSON file
  (`MTP_EXT_CACHE_DIR`, default ~/.cache/mtp_ext).
- Choice: `Plan.choose(B)`, the candidate of most expected tokens per second, E_B / t(K, B); a
  drafting one only where it beats plain decoding by MARGIN (the grid's steps accept almost
  nothing, so the kept paths that the draft heads then run on are shorter than in decoding).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

STATS_PATHS = 64       # the most frequent rank paths, whose prefixes are the candidate trees
TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)  # candidate trees: nodes below the root
MARGIN = 1.05          # a drafting choice must beat plain decoding's expected rate by this
TIMED_STEPS, WARM_STEPS = 8, 2


def draft_statistics(ranks: Sequence[torch.Tensor]) -> List[List[tuple]]:
    """ranks: per calibration text, [N, n-1], per position the rank draft head k gave the token
    greedy decoding made k + 1 places ahead. Returns them as lists of rank rows (the
    checkpoint's draft_stats)."""
    return [[tuple(int(r) for r in row) for row in t.tolist()] for t in ranks]


def shares(stats, top: int = STATS_PATHS) -> Dict[tuple, float]:
    """The `top` most frequent rank paths of the positions of stats (prefixes first on ties,
    so the set, and each prefix of its order, is prefix-closed) and their share of positions."""
    counts: dict = {}
    for text in stats:
        for row in text:
            for d in range(1, len(row) + 1):
                counts[row[:d]] = counts.get(row[:d], 0) + 1
    N = max(1, sum(len(t) for t in stats))
    best = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:top]
    return {p: counts[p] / N for p in best}


def ordered_paths(stats, top: int = STATS_PATHS) -> List[tuple]:
    """The rank paths of stats, most frequent first: any prefix of this list is a tree."""
    return list(shares(stats, top))


def tokens_per_step(paths: Sequence[tuple], text: Sequence[tuple]) -> float:
    """Greedy tree decoding of a calibration text, replayed from its rank rows: each step keeps
    the longest prefix of the row at its position that is a path of the tree, and the next
    step starts after it. Returns the tokens per step."""
    tree = {tuple(p) for p in paths}
    pos = steps = made = 0
    while pos < len(text):
        row, run = text[pos], 0
        while run < len(row) and row[:run + 1] in tree:
            run += 1
        steps, made, pos = steps + 1, made + 1 + run, pos + 1 + run
    return made / max(1, steps)


def expected_tokens(paths: Sequence[tuple], stats, batch: int = 1) -> float:
    """Expected tokens per step with the tree of these rank paths, of `batch` sequences each
    like a calibration text drawn at random, decoded to a length: the batch takes as many steps
    as its slowest sequence, steps per token max_b 1 / e_b (e_b: sequence b's tokens per step),
    and this is 1 / E[max_b 1 / e_b]. batch 1: all the texts' tokens over all their steps."""
    per_text = [tokens_per_step(paths, t) for t in stats if t]
    if not per_text:
        return 1.0
    s, P = sorted(1.0 / e for e in per_text), len(per_text)
    # P(max <= s_i) = ((i + 1) / P) ** batch over the sorted values
    steps = sum(x * (((i + 1) / P) ** batch - (i / P) ** batch) for i, x in enumerate(s))
    return 1.0 / steps


def check_stats(stats, n_future: int, what: str = "draft_stats") -> List[List[tuple]]:
    """stats as lists (one per calibration text) of rank rows of n_future - 1 ranks >= 0."""
    try:
        out = [[tuple(int(r) for r in row) for row in text] for text in stats]
        if not out or not all(len(row) == n_future - 1 and min(row) >= 0
                              for text in out for row in text):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be lists (one per calibration text) of rank rows of "
                         f"{n_future - 1} ranks >= 0") from None
    return out


class StepTimes:
    """Seconds of a decoding step: `plain[B]`, one token per sequence; `tree[B][K]`, verifying
    K tokens (a tree of K - 1 candidates and the next token) and drafting after the kept path,
    timed on random prompts, where the kept path is the next token alone; `draft[B][m]`, the
    draft heads on a kept path of m tokens, which corrects tree[B][K] for the kept paths of
    decoding (m = the expected tokens per step). In K, the least-squares line through the
    measured points of each B (a step's time grows with the tokens it verifies; single timed
    points are noisy); linear between the measured m and B, constant past the largest B."""

    def __init__(self, plain: Dict[int, float], tree: Dict[int, Dict[int, float]],
                 draft: Optional[Dict[int, Dict[int, float]]] = None):
        as_grid = lambda g: {int(b): {int(k): float(t) for k, t in ks.items()}
                             for b, ks in (g or {}).items()}
        self.plain = {int(b): float(t) for b, t in plain.items()}
        self.tree, self.draft = as_grid(tree), as_grid(draft)

    def to_dict(self) -> dict:
        return {"plain": self.plain, "tree": self.tree, "draft": self.draft}

    @staticmethod
    def _interp(points: Dict[int, float], x: float) -> float:
        xs = sorted(points)
        if x <= xs[0]:
            return points[xs[0]]
        if x >= xs[-1]:
            return points[xs[-1]]
        hi = next(v for v in xs if v >= x)
        lo = max(v for v in xs if v <= x)
        if hi == lo:
            return points[lo]
        w = (x - lo) / (hi - lo)
        return (1 - w) * points[lo] + w * points[hi]

    def plain_time(self, B: int) -> float:
        return self._interp(self.plain, B)

    @staticmethod
    def _line(points: Dict[int, float], x: float) -> float:
        """The least-squares line through points (K, seconds) at x, its slope at least 0: one
        step timed per grid point is noisy, and a noisy point must not make a bigger tree look
        cheaper than a smaller one."""
        xs = sorted(points)
        if len(xs) == 1:
            return points[xs[0]] * x / xs[0]
        mx = sum(xs) / len(xs)
        my = sum(points[k] for k in xs) / len(xs)
        slope = max(0.0, sum((k - mx) * (points[k] - my) for k in xs)
                    / sum((k - mx) ** 2 for k in xs))
        return my + slope * (x - mx)

    def tree_time(self, K: int, B: int, kept: float = 1.0) -> float:
        per_b = {b: self._line(ks, K) for b, ks in self.tree.items()}
        extra = 0.0
        if self.draft:
            per_m = lambda m: self._interp({b: self._interp(ms, m) for b, ms in
                                            self.draft.items()}, B)
            extra = max(0.0, per_m(kept) - per_m(1.0))
        return self._interp(per_b, B) + extra


@dataclass
class Choice:
    """One way to decode a step: `paths` the rank paths verified (None: plain decoding)."""
    name: str
    paths: Optional[Tuple[tuple, ...]]
    tokens: float       # expected tokens per step of the batch's slowest sequence
    seconds: float      # expected step time at the batch size it was chosen for

    @property
    def rate(self) -> float:
        """Expected tokens per second per sequence (at the slowest one's pace)."""
        return self.tokens / self.seconds


class Plan:
    """Per batch size, the choice of most expected tokens per second (see the module's doc)."""

    def __init__(self, stats: Dict[tuple, float], times: StepTimes, n_future: int,
                 max_nodes: int, margin: float = MARGIN):
        self.stats, self.times, self.n, self.margin = stats, times, n_future, margin
        order = ordered_paths(stats)
        self.trees = [tuple(order[:m]) for m in TREE_SIZES if m <= min(len(order), max_nodes)]
        chain = tuple((0,) * d for d in range(1, n_future))
        self.chain = chain if len(chain) <= max_nodes else None
        self._chosen: Dict[int, Choice] = {}

    def options(self, B: int) -> List[Choice]:
        """Every candidate at batch B, plain first."""
        t = self.times
        out = [Choice("plain", None, 1.0, t.plain_time(B))]
        if self.chain is not None:
            e = expected_tokens(self.chain, self.stats, B)
            out.append(Choice("chain", self.chain, e, t.tree_time(len(self.chain) + 1, B, e)))
        for p in self.trees:
            e = expected_tokens(p, self.stats, B)
            out.append(Choice(f"tree of {len(p)}", p, e, t.tree_time(len(p) + 1, B, e)))
        return out

    def choose(self, B: int) -> Choice:
        if B not in self._chosen:
            opts = self.options(B)
            best = max(opts[1:], key=lambda c: c.rate, default=None)
            self._chosen[B] = (best if best is not None and best.rate >= self.margin * opts[0].rate
                               else opts[0])
        return self._chosen[B]

    def why(self, B: int, top: int = 3) -> str:
        """One line: the choice at B and the expected rates it was weighed against."""
        opts = sorted(self.options(B), key=lambda c: -c.rate)
        shown = opts[:top] + [c for c in opts[top:] if c.name == "plain"]
        c = self.choose(B)
        return (f"batch {B}: {c.name} (expected, per sequence: " + "; ".join(
            f"{o.name} {o.tokens:.2f} tokens / {o.seconds * 1e3:.2f} ms = {o.rate:.0f} tok/s"
            for o in shown) + ")")


# ---- measured step times ----

def _cache_file() -> Path:
    root = os.environ.get("MTP_EXT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mtp_ext")
    return Path(root) / "step_times.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(model, batches: Sequence[int], sizes: Sequence[int]) -> str:
    """What a step's time depends on: the configuration, dtypes, device, CPU, threads, torch,
    and the grid."""
    p = model.embed.weight
    dev = (torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else _cpu_name())
    return json.dumps([model.cfg.to_dict(), str(p.dtype), str(model._draft_dtype()),
                       p.device.type, dev, torch.get_num_threads(), torch.__version__,
                       list(batches), list(sizes)], sort_keys=True)


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, times: StepTimes):
    f = _cache_file()
    try:
        data = _read_cache()
        data[key] = times.to_dict()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, f)
    except OSError:  # a read-only home: measured again next process
        pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_step_times(model, batches: Sequence[int], sizes: Sequence[int],
                       paths: Sequence[tuple], steps: int = TIMED_STEPS,
                       warm: int = WARM_STEPS, seed: int = 0) -> StepTimes:
    """Median seconds of `steps` real decoding steps (after `warm`) on random prompts: plain
    steps and tree steps verifying K = m + 1 tokens with the first m of paths, for m in sizes,
    at each batch size."""
    from .generate import DraftTree, _Decoding, _plain_step, _prefill, _Sampler, _TreeSteps
    n, dev = model.cfg.n_future, model.embed.weight.device
    g = torch.Generator().manual_seed(seed)
    plen = _prompt_len(model)

    def decoding(B):
        ids = torch.randint(model.cfg.vocab_size, (B, plen), generator=g).to(dev)
        s = _Decoding(model, ids, (warm + steps + 1) * n, n, None, _Sampler(0.0, None, None))
        _prefill(s, ids, torch.full((B,), plen, dtype=torch.long))
        s.last = s.last[1:]
        return s

    def median(f, fresh, K):
        out, s = [], fresh()
        for i in range(warm + steps):
            if int(s.pos.max()) + K + n > model.cfg.max_seq_len:  # out of room: a new prompt
                s = fresh()
            _sync(dev)
            t = time.perf_counter()
            f(s)
            _sync(dev)
            out.append(time.perf_counter() - t)
        return statistics.median(out[warm:])

    def timed(B, step, K, heads=n):
        def fresh():
            s = decoding(B)
            s.heads = heads
            return s
        return median(step, fresh, K)

    def drafting(B, m):  # the draft heads on a kept path of m tokens
        x = torch.randn(B, m, model.cfg.d_model, generator=g).to(model.embed.weight)
        return median(lambda s: model.draft_forward(x, s.caches, s.pos), lambda: decoding(B), m)

    was = model.training
    model.eval()
    try:
        plain, tree, draft = {}, {}, {}
        for B in batches:
            plain[B] = timed(B, _plain_step, 1, heads=1)
            tree[B] = {m + 1: timed(B, _TreeSteps(DraftTree(paths[:m], n), n, dev,
                                                  step_down=False), m + 1) for m in sizes}
            draft[B] = {m: drafting(B, m) for m in (1, n)}
        return StepTimes(plain, tree, draft)
    finally:
        model.train(was)


def grid(model, batch: int, max_nodes: int) -> Tuple[List[int], List[int]]:
    """The batch sizes (powers of 2 up to the first >= batch) and tree sizes (nodes) timed."""
    Bs = [1]
    while Bs[-1] < batch:
        Bs.append(Bs[-1] * 2)
    n = model.cfg.n_future
    cap = min(max_nodes, max(TREE_SIZES))
    sizes = sorted({m for m in (1, n - 1, 3, 7, 15, 24, 32, 48, cap) if 1 <= m <= cap})
    return Bs, sizes


def step_times(model, batch: int, paths: Sequence[tuple], max_nodes: int,
               refresh: bool = False) -> Tuple[StepTimes, float]:
    """StepTimes for batches up to `batch` and trees up to max_nodes: from the model's memory,
    else from the cache file, else measured (and written there). Returns them and the seconds
    spent measuring (0 when cached)."""
    max_nodes = min(max_nodes, len(paths))
    Bs, sizes = grid(model, batch, max_nodes)
    key = cache_key(model, Bs, sizes)
    mem = model.__dict__.setdefault("_step_times", {})
    if not refresh and key in mem:
        return mem[key], 0.0
    if not refresh:
        hit = _read_cache().get(key)
        if hit is not None:
            try:
                mem[key] = StepTimes(hit["plain"], hit["tree"], hit.get("draft"))
                return mem[key], 0.0
            except (KeyError, TypeError, ValueError, AttributeError):
                pass
    t = time.perf_counter()
    mem[key] = measure_step_times(model, Bs, sizes, paths)
    _write_cache(key, mem[key])
    return mem[key], time.perf_counter() - t


def timing_room(model) -> int:
    """The most tree nodes measure_step_times can time within the model's max_seq_len (a tree
    and the drafts after it, after a prompt)."""
    L, n = model.cfg.max_seq_len, model.cfg.n_future
    return L - _prompt_len(model) - n - 1


def _prompt_len(model) -> int:
    """The random prompts' length in measure_step_times: a context of decoding's order."""
    return max(1, min(128, model.cfg.max_seq_len // 4))
