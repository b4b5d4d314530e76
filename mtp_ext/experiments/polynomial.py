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
from typing import List, Tuple

P, DEGREE = 7, 5                     # coefficients in F7, polynomials mod X^5
NEG, ADD, MUL, COMP, EQ, BOS = range(P, P + 6)
VOCAB = P + 6                        # 13 tokens
OPS = {NEG: 1, ADD: 2, MUL: 2, COMP: 2}  # operator -> arity
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


def describe() -> str:
    return ("polynomial arithmetic over F7[X]/(X^5): negation, addition, multiplication and "
            "composition in prefix notation, m operations; exact match of the 5 result "
            "coefficients")
