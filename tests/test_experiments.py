"""The experiments' tasks against independent computations (polynomials: numpy convolutions
mod 7 and a stack machine over the prefix tokens; induction: the names and mentions read back
from the tokens), their train/test splits, the run records that make an experiment resumable,
the SVG plot, and `mtp-ext experiment` end to end for a few steps of each task."""
import json
import re
import random
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from mtp_ext.cli import main as cli_main
from mtp_ext.experiments import polynomial as task
from mtp_ext.experiments import induction, runner
from mtp_ext.experiments.plot import Panel, svg
from mtp_ext.experiments.polynomial import make_batch, test_set as held_out


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


def test_exact_match_per_operation():
    right = torch.tensor([True, False, True, True, False])
    ops = torch.tensor([task.NEG, task.NEG, task.ADD, task.MUL, task.MUL])
    assert task.by_operation(right, ops) == {"1:neg": 0.5, "1:add": 1.0, "1:mul": 0.5}
    # a record from before the split has no breakdown table, and the main table keeps it
    recs = [dict(label="n=1, 5 steps", seed=0, train_seconds=1.0,
                 acc={str(m): 0.25 for m in range(1, 8)})]
    t = task.Task(test_count=16)
    assert t.breakdown(recs) is None
    assert runner.tables(t, recs).count("| n=1, 5 steps | 25.0 |") == 1
    recs.append(dict(recs[0], seed=1, acc=dict(recs[0]["acc"], **{"1:neg": 1.0, "1:add": 0.0,
                                                                  "1:mul": 0.0, "1:comp": 0.5})))
    text = runner.tables(t, recs)
    assert "| n=1, 5 steps | 100.0 | 0.0 | 0.0 | 50.0 | 1 |" in text
    assert "| n=1, 5 steps | 25.0 (25.0-25.0) |" in text


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
    # m = 1 per operation, its prompt counts adding up to the held-out prompts
    assert "| run | neg | add | mul | comp | seeds |" in text
    counts = re.search(r"m = 1 by operation \(of the 8 held-out prompts: neg (\d+), add (\d+), "
                       r"mul (\d+), comp (\d+)\)", text)
    assert counts and sum(map(int, counts.groups())) == 8
    assert cli_main(["experiment", "polynomial", "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_polynomial_trained_on_fewer_difficulties(tmp_path, capsys):
    out = tmp_path / "experiments.md"
    args = ["experiment", "polynomial", "--steps", "2", "--seeds", "1", "--heads", "1",
            "--no-equal-compute", "--test-count", "4", "--recipe", "constant", "--out", str(out)]
    assert cli_main(args + ["--train-m", "2", "1"]) == 0
    text = out.read_text()
    assert "<!-- polynomial-train-m1-2-constant -->" in text
    assert "## Polynomial arithmetic, trained on m in [1, 2] (constant learning rate)" in text
    assert "Trained on m in [1, 2] (uniform)" in text and "m=3 (out of domain)" in text
    assert (tmp_path / "experiments" / "polynomial-train-m1-2-constant.svg").exists()
    x, _ = task.Task(train_ms=[1, 2]).batch(random.Random(0), 64)
    assert x.shape[1] == task.max_len(2) == 24          # sequences of m <= 2 only
    assert all(sum(t in task.OPS for t in row) <= 2 for row in x.tolist())
    capsys.readouterr()
    assert cli_main(args + ["--train-m", "0"]) == 2
    assert "--train-m must be positive" in capsys.readouterr().err
    assert cli_main(["experiment", "induction", "--train-m", "1"]) == 2
    assert "--train-m is for the polynomial task, not 'induction'" in capsys.readouterr().err


def test_runs_are_read_back_from_the_records(tmp_path, monkeypatch, capsys):
    out = tmp_path / "experiments.md"
    args = ["experiment", "polynomial", "--steps", "2", "--seeds", "1", "--heads", "1", "2",
            "--no-equal-compute", "--test-count", "4", "--out", str(out)]
    assert cli_main(args) == 0
    records = tmp_path / "experiments" / "polynomial-runs.jsonl"
    lines = records.read_text().splitlines()
    assert [json.loads(l)["n"] for l in lines] == [1, 2]
    first = out.read_text()

    def no_training(*a, **k):
        raise AssertionError("a recorded run was trained again")
    monkeypatch.setattr(runner, "train_one", no_training)
    assert cli_main(args) == 0                       # every run read back, none trained
    assert records.read_text().splitlines() == lines and out.read_text() == first
    with pytest.raises(AssertionError, match="trained again"):  # another seed is a new run
        cli_main(args[:4] + ["--seeds", "2"] + args[6:])
    with pytest.raises(AssertionError, match="trained again"):  # and another recipe
        cli_main(args + ["--recipe", "constant"])
    records.write_text(lines[0] + "\nnot json\n")
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "polynomial-runs.jsonl, line 2: not a run record" in capsys.readouterr().err


def test_plan_puts_the_main_comparison_first():
    runs = runner.plan(induction.Task(), 10, [0, 1], [1, 2, 4], [64], 2, True)
    order = [(r["group"], r["seed"]) for r in runs]
    assert order[:4] == [("n=1", 0), ("n=4", 0), ("n=1", 1), ("n=4", 1)]
    assert order[4:6] == [("n=2", 0), ("n=2", 1)]
    assert [g for g, _ in order[6:]] == ["n=1, the FLOPs of n=4"] * 2
    eq = runs[-1]["steps"]
    cfg = lambda n: runner.config(induction.Task(), n, 64, 2)
    assert eq == round(10 * runner.token_flops(cfg(4)) / runner.token_flops(cfg(1))) and eq > 10


def test_induction_sequences_read_back():
    """The names and mentions, recovered from the tokens alone; words follow the language."""
    table = induction.language()
    rng = random.Random(3)
    repeated = 0
    for _ in range(300):
        tokens, mentions = induction.sample(rng)
        assert len(tokens) == induction.LENGTH and tokens[0] == induction.BOS
        is_name = [induction.WORDS <= t < induction.BOS for t in tokens]
        found, second_of, i = [], {}, 1
        while i < len(tokens):
            if is_name[i]:
                a, b = tokens[i], tokens[i + 1]
                assert is_name[i + 1] and not is_name[i - 1]   # two name tokens after a word
                found.append((i, a in second_of))
                assert second_of.setdefault(a, b) == b           # a first token names one name
                i += 2
                continue
            if not is_name[i - 1] and tokens[i - 1] != induction.BOS:
                assert tokens[i] in table[tokens[i - 1]][0]      # a word follows the bigrams
            i += 1
        assert found == mentions and len(second_of) <= induction.NAMES_PER_SEQUENCE
        repeated += sum(r for _, r in mentions)
    assert repeated > 1000                                      # repeated mentions are common


def test_induction_test_sequences_are_not_training_sequences():
    seqs, _ = induction.test_set(200)
    test = {tuple(r) for r in seqs.tolist()}
    for seed in range(3):
        x, y = induction.make_batch(random.Random(seed), 500)
        assert torch.equal(x, y) and not test & {tuple(r) for r in x.tolist()}


class _Oracle:
    """A stand-in model whose head-0 logits are one-hot on a given next token."""
    def __init__(self, predict):
        self.predict = predict

    def trunk_forward(self, x):
        return x, None, None

    def head_forward(self, k, x, cos, sin):
        return x

    def head_logits(self, k, x):
        return torch.nn.functional.one_hot(self.predict(x), induction.VOCAB).float()


def test_induction_accuracies_against_a_direct_count():
    perfect = _Oracle(lambda x: torch.cat([x[:, 1:], x[:, :1]], 1))
    assert induction.accuracies(perfect, 40, batch=16) == {"repeated": 1.0, "first": 1.0,
                                                           "words": 1.0}
    guess = induction.WORDS + 5                    # always the same name token
    acc = induction.accuracies(_Oracle(lambda x: torch.full_like(x, guess)), 40, batch=16)
    seqs, mentions = induction.test_set(40)
    for kind, repeated in (("repeated", True), ("first", False)):
        hits = [int(seqs[j, p + 1]) == guess for j, ms in enumerate(mentions)
                for p, r in ms if r == repeated]
        assert acc[kind] == pytest.approx(sum(hits) / len(hits))
    assert acc["words"] == 0.0


def test_svg_plot(tmp_path):
    path = tmp_path / "p.svg"
    svg(path, [Panel("a", "x", "y", {"n=1": ([0, 1, 2], [10.0, 5.0, 1.0], [9, 4, 0], [11, 6, 2]),
                                     "n=4": ([0, 1, 2], [30.0, 20.0, 2.0])}, xticks=["1", "2", "3"]),
               Panel("b", "s", "loss", {"n=1": ([1.5, 7.0], [2.5, 1.9])})])
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 3 and all(len(l.get("points").split()) in (2, 3) for l in lines)
    assert len(root.findall(f"{ns}line")) >= 3 + 2   # the min-max bars and the legend
    texts = [t.text for t in root.findall(f"{ns}text")]
    assert {"n=1", "n=4", "a", "b", "loss"} <= set(texts)


def test_induction_and_bytes_commands_end_to_end(tmp_path):
    out = tmp_path / "experiments.md"
    assert cli_main(["experiment", "induction", "--steps", "3", "--seeds", "1", "--sizes", "16",
                     "32", "--heads", "1", "2", "--test-count", "8", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| d_model 16, n=1, 3 steps |" in text and "| d_model 32, n=2, 3 steps |" in text
    assert "name, repeated mention" in text and (tmp_path / "experiments" / "induction.svg").exists()
    assert cli_main(["experiment", "bytes", "--steps", "2", "--heads", "1", "2",
                     "--out", str(out)]) == 0
    recs = [json.loads(l) for l in (tmp_path / "experiments" / "bytes-runs.jsonl").read_text().splitlines()]
    assert [r["n"] for r in recs] == [1, 2]
    assert all(r["curve"][-1]["step"] == 2 and r["curve"][-1]["seconds"] > 0 for r in recs)
    text = out.read_text()
    assert "<!-- induction -->" in text and "<!-- bytes -->" in text and "n=2: head-0 loss" in text
