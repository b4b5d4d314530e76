"""The polynomial task against an independent computation (numpy convolutions mod 7, a stack
machine over the prefix tokens), its train/test split, and `mtp-ext experiment` end to end for
a few steps."""
import random

import numpy as np
import pytest

from mtp_ext.cli import main as cli_main
from mtp_ext.experiments import polynomial as task
from mtp_ext.experiments.runner import make_batch, test_set as held_out


def np_mul(f, g):
    return (np.convolve(f, g)[:task.DEGREE] % 7).astype(int)


def np_compose(f, g):
    out, power = np.zeros(task.DEGREE, dtype=int), np.eye(1, task.DEGREE, dtype=int)[0]
    for a in f:  # sum_i f_i g^i, each power truncated
        out = (out + a * power) % 7
        power = np_mul(power, g)
    return out


def stack_eval(tokens):
    """The prefix expression, evaluated right to left with a stack."""
    stack = []
    i = len(tokens)
    while i > 0:
        t = tokens[i - 1]
        if t < 7:  # the last coefficient of a leaf: take the whole leaf
            stack.append(np.array(tokens[i - task.DEGREE:i]))
            i -= task.DEGREE
            continue
        a = stack.pop()
        if t == task.NEG:
            stack.append((-a) % 7)
        else:
            b = stack.pop()
            stack.append({task.ADD: lambda: (a + b) % 7, task.MUL: lambda: np_mul(a, b),
                          task.COMP: lambda: np_compose(a, b)}[t]())
        i -= 1
    assert len(stack) == 1
    return stack[0].tolist()


@pytest.mark.parametrize("m", range(0, 7))
def test_results_match_an_independent_computation(m):
    rng = random.Random(m)
    ops = set()
    for _ in range(150):
        e = task.random_expression(rng, m)
        tokens = task.prefix(e)
        assert sum(t in task.OPS for t in tokens) == m
        assert task.evaluate(e) == stack_eval(tokens), tokens
        ops |= {t for t in tokens if t in task.OPS}
    assert m < 3 or ops == set(task.OPS)


def test_composition_and_product_by_hand():
    x_plus_1, x = [1, 1, 0, 0, 0], [0, 1, 0, 0, 0]
    assert task.mul(x_plus_1, x_plus_1) == [1, 2, 1, 0, 0]
    assert task.compose([0, 0, 0, 0, 1], x_plus_1) == [1, 4, 6, 4, 1]   # (X + 1)^4
    assert task.compose([0, 0, 1, 0, 0], [0, 0, 0, 1, 0]) == [0] * 5    # X^6 = 0 mod X^5
    assert task.mul([0, 0, 0, 3, 0], [0, 0, 5, 0, 0]) == [0] * 5


def test_test_prompts_never_occur_in_training():
    rng = random.Random(0)
    train = set()
    for _ in range(3000):
        p, _ = task.sample(rng, rng.choice([1, 2]), test=False)
        assert not task.is_test(p)
        train.add(tuple(p))
    for m in (1, 2):
        prompts, lens, answers = held_out(m, 200)
        for row, L in zip(prompts.tolist(), lens):
            assert task.is_test(row[:L]) and tuple(row[:L]) not in train
    x, y = make_batch(random.Random(1), [1, 3], 16, task.max_len(3))
    for xb, yb in zip(x.tolist(), y.tolist()):  # labels: the answer, after EQ, only
        at = xb.index(task.EQ)
        assert all(v == -100 for v in yb[:at + 1])
        assert yb[at + 1:at + 6] == xb[at + 1:at + 6] and all(v == -100 for v in yb[at + 6:])


def test_experiment_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "experiments.md"
    out.write_text("# Experiments\n\nkept text\n")
    args = ["experiment", "polynomial", "--steps", "3", "--seeds", "1", "--heads", "1", "2",
            "--test-count", "8", "--out", str(out)]
    for _ in range(2):  # the second run replaces its section
        assert cli_main(args) == 0
    text = out.read_text()
    assert text.count("<!-- polynomial -->") == 1 and "kept text" in text
    assert "| n=1, 3 steps |" in text and "| n=2, 3 steps |" in text
    assert "(the FLOPs of n=2)" in text and "m=6 (out of domain)" in text
    assert "mtp-ext experiment polynomial --steps 3" in text
    assert cli_main(["experiment", "polynomial", "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
