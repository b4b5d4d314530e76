"""Polynomial arithmetic over F7[X]/(X^5) (Gloeckle et al. 2024, sec. 4): an expression of m
operations (negation, addition, multiplication, composition) on polynomials, in prefix
notation, then `=` and the result's 5 coefficients. A polynomial is 5 coefficient tokens
c0..c4 (c0 + c1 X + ... + c4 X^4, each in 0..6).

    BOS + * c0 c1 c2 c3 c4 c0 c1 c2 c3 c4 o ... = r0 r1 r2 r3 r4

Test prompts never occur in training: a prompt is a test prompt when a hash of its tokens says
so (1 in 8), and training draws only the others."""
from __future__ import annotations

import random
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

P, DEGREE = 7, 5                     # coefficients in F7, polynomials mod X^5
NEG, ADD, MUL, COMP, EQ, BOS = range(P, P + 6)
VOCAB = P + 6                        # 13 tokens
OPS = {NEG: 1, ADD: 2, MUL: 2, COMP: 2}  # operator -> arity
OP_NAMES = {NEG: "neg", ADD: "add", MUL: "mul", COMP: "comp"}
ANSWER = DEGREE                      # answer tokens per prompt
TEST_BUCKETS = 8                     # 1 in 8 prompts is held out for testing


def add(f, g):
    return [(a + b) % P for a, b in zip(f, g)]


def neg(f):
    return [(-a) % P for a in f]


def mul(f, g):
    """f g mod X^5."""
    out = [0] * DEGREE
    for i, a in enumerate(f):
        for j in range(DEGREE - i):
            out[i + j] = (out[i + j] + a * g[j]) % P
    return out


def compose(f, g):
    """f(g(X)) mod X^5, by Horner's rule."""
    out = [0] * DEGREE
    for a in reversed(f):
        out = mul(out, g)
        out[0] = (out[0] + a) % P
    return out


def random_expression(rng: random.Random, m: int) -> list:
    """A random expression tree with m operations: a leaf is a list of 5 coefficients, a node
    (op, child, ...)."""
    if m == 0:
        return [rng.randrange(P) for _ in range(DEGREE)]
    op = rng.choice(list(OPS))
    if OPS[op] == 1:
        return (op, random_expression(rng, m - 1))
    left = rng.randrange(m)  # operations in the left operand
    return (op, random_expression(rng, left), random_expression(rng, m - 1 - left))


def evaluate(e) -> List[int]:
    if isinstance(e, list):
        return e
    op, *args = e
    vals = [evaluate(a) for a in args]
    return {NEG: lambda: neg(vals[0]), ADD: lambda: add(*vals), MUL: lambda: mul(*vals),
            COMP: lambda: compose(*vals)}[op]()


def prefix(e) -> List[int]:
    if isinstance(e, list):
        return list(e)
    op, *args = e
    return [op] + [t for a in args for t in prefix(a)]


def is_test(prompt: List[int]) -> bool:
    return zlib.crc32(bytes(prompt)) % TEST_BUCKETS == 0


def sample(rng: random.Random, m: int, test: bool) -> Tuple[List[int], List[int]]:
    """(prompt, answer): prompt = BOS, the expression in prefix notation, EQ; drawn until it
    falls on the requested side of the train/test split."""
    while True:
        e = random_expression(rng, m)
        prompt = [BOS] + prefix(e) + [EQ]
        if is_test(prompt) == test:
            return prompt, evaluate(e)


def max_len(m: int) -> int:
    """The longest sequence (prompt and answer) with m operations: all binary."""
    return 2 + m + DEGREE * (m + 1) + ANSWER


IGNORE = -100


def make_batch(rng: random.Random, ms: Sequence[int], size: int, length: int):
    """size training sequences (inputs, labels [size, length]): labels on the answer only."""
    x = torch.full((size, length), BOS, dtype=torch.long)
    y = torch.full((size, length), IGNORE, dtype=torch.long)
    for b in range(size):
        prompt, answer = sample(rng, rng.choice(list(ms)), test=False)
        seq = prompt + answer
        x[b, :len(seq)] = torch.tensor(seq)
        y[b, len(prompt):len(seq)] = torch.tensor(answer)
    return x, y


def test_set(m: int, count: int):
    """The held-out prompts of difficulty m (the same for every run): padded [count, P], lengths,
    answers [count, 5]."""
    rng = random.Random(1_000_003 * m)
    rows = [sample(rng, m, test=True) for _ in range(count)]
    width = max(len(p) for p, _ in rows)
    prompts = torch.full((count, width), BOS, dtype=torch.long)
    for i, (p, _) in enumerate(rows):
        prompts[i, :len(p)] = torch.tensor(p)
    return prompts, [len(p) for p, _ in rows], torch.tensor([a for _, a in rows])


@torch.no_grad()
def correct(model, m: int, count: int, batch: int = 250):
    """Head 0's greedy decoding of the 5 answer tokens on the held-out prompts of difficulty m:
    (all 5 right, per prompt [count] bool; the prompt's outermost operation [count])."""
    prompts, lens, answers = test_set(m, count)
    right = []
    for i in range(0, count, batch):
        p, L = prompts[i:i + batch], lens[i:i + batch]
        out = model.generate(p, ANSWER, prompt_lengths=L).tokens
        got = torch.stack([out[j, l:l + ANSWER] for j, l in enumerate(L)])
        right.append((got == answers[i:i + batch]).all(1))
    return torch.cat(right), prompts[:, 1]


def by_operation(right: torch.Tensor, ops: torch.Tensor) -> Dict[str, float]:
    """Exact match per outermost operation (at m = 1: per operation), keyed "1:neg" etc."""
    return {f"1:{name}": float(right[ops == op].float().mean())
            for op, name in OP_NAMES.items() if bool((ops == op).any())}


class Task:
    """The experiment runner's view of the task (mtp_ext/experiments/runner.py)."""
    name, title = "polynomial", "Polynomial arithmetic"
    vocab = VOCAB
    metric = "head 0's greedy decoding, exact match of the 5 result coefficients"
    key_name = "m (operations; * out of domain)"
    plot_title, plot_ylabel = "Polynomial arithmetic: exact match by difficulty", "exact match (%)"
    # the runner's defaults: model sizes (d_model), trunk layers, steps, n, AdamW lr, batch
    sizes, layers, steps, heads, lr, batch_size = [128], 2, 1000, [1, 2, 4], 2e-3, 128

    def __init__(self, train_ms: Sequence[int] = (1, 2, 3, 4, 5),
                 test_ms: Sequence[int] = (1, 2, 3, 4, 5, 6, 7), test_count: int = 500):
        self.train_ms, self.test_ms, self.test_count = list(train_ms), list(test_ms), test_count
        # another training set of difficulties: its own section and plot (e.g. "-train-m1-2")
        default = list(train_ms) == [1, 2, 3, 4, 5]
        self.variant = "" if default else "-train-m" + "-".join(map(str, self.train_ms))
        self.subtitle = "" if default else f", trained on m in {self.train_ms}"
        self.max_seq_len = max_len(max(self.train_ms + self.test_ms)) + 8
        self.length = max_len(max(self.train_ms))

    def settings(self) -> dict:
        return dict(train_ms=self.train_ms, test_ms=self.test_ms, test_count=self.test_count)

    def batch(self, rng: random.Random, size: int):
        return make_batch(rng, self.train_ms, size, self.length)

    def evaluate(self, model) -> Dict[str, float]:
        """Exact match per m, and at m = 1 per operation (keys "1:neg", "1:add", ...)."""
        acc = {}
        for m in self.test_ms:
            right, ops = correct(model, m, self.test_count)
            acc[str(m)] = float(right.float().mean())
            if m == 1:
                acc.update(by_operation(right, ops))
        return acc

    def breakdown(self, recs: List[dict]) -> Optional[Tuple[str, List[Tuple[str, str]]]]:
        """The second table of the report: m = 1 per operation, for the runs that measured it
        (records from before the split have none): (its heading, its columns)."""
        if 1 not in self.test_ms or not any("1:neg" in r["acc"] for r in recs):
            return None
        ops = test_set(1, self.test_count)[0][:, 1]
        counts = ", ".join(f"{name} {int((ops == op).sum())}" for op, name in OP_NAMES.items())
        return (f"m = 1 by operation (of the {self.test_count} held-out prompts: {counts})",
                [(f"1:{name}", name) for name in OP_NAMES.values()])

    def columns(self) -> List[Tuple[str, str]]:
        return [(str(m), f"m={m}" + ("" if m in self.train_ms else " (out of domain)"))
                for m in self.test_ms]

    def describe(self) -> str:
        return (f"Polynomial arithmetic over F7[X]/(X^5) (Gloeckle et al. 2024, sec. 4): "
                f"negation, addition, multiplication and composition in prefix notation, m "
                f"operations, then `=` and the 5 result coefficients; labels on the answer "
                f"only. Trained on m in {self.train_ms} (uniform), tested on {self.test_count} "
                f"held-out prompts per m (a hash of the prompt keeps 1 in {TEST_BUCKETS} out of "
                f"training); {self.metric}.")
