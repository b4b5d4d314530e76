"""Induction (Gloeckle et al. 2024, sec. 4.1): text in which names of two tokens recur; once a
name has been seen, its second token can only be predicted by copying it from the earlier
mention (an induction head). The paper replaces the names of children's stories by random
two-token names; offline here, the "stories" are a fixed random bigram language over word
tokens (each word has a few likely successors: text a model can learn to predict, as the
stories are), with names inserted between words.

    vocabulary: WORDS word tokens, NAMES name tokens, BOS
    a sequence: BOS w w w a b w w w w c d w w a b w ...   (a b and c d: names of the sequence)

Each sequence has its own names (first tokens distinct, second tokens random), so nothing but
the earlier mention tells the second token. Measured on held-out sequences (another random
stream than every training seed's), teacher-forced, head 0's argmax at the first token of a
name: for repeated mentions (the induction accuracy), for first mentions (a control: chance is
1 / NAMES) and for words (how well the language itself is learned)."""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

import torch

WORDS, NAMES = 48, 16
BOS = WORDS + NAMES
VOCAB = BOS + 1
LENGTH = 96                # tokens per sequence, BOS included
NAMES_PER_SEQUENCE = 3
MENTION_RATE = 0.12        # a name follows a word with this probability
SUCCESSORS = 4             # likely next words per word in the bigram language
LANGUAGE_SEED = 20240430   # fixes the language (the same for every run)
TEST_SEED = 10 ** 9 + 7    # the held-out stream: no training seed draws it


def language() -> List[Tuple[List[int], List[float]]]:
    """Per word: its likely successors and their weights (a fixed random bigram table)."""
    rng = random.Random(LANGUAGE_SEED)
    table = []
    for _ in range(WORDS):
        nxt = rng.sample(range(WORDS), SUCCESSORS)
        weights = [rng.random() + 0.2 for _ in nxt]
        table.append((nxt, [w / sum(weights) for w in weights]))
    return table


_LANGUAGE = language()


def sample(rng: random.Random):
    """One sequence and its name mentions: tokens [LENGTH], and per mention (position of the
    name's first token, repeated?)."""
    firsts = rng.sample(range(NAMES), NAMES_PER_SEQUENCE)
    names = [(WORDS + a, WORDS + rng.randrange(NAMES)) for a in firsts]
    seen = set()
    tokens, mentions = [BOS], []
    word = rng.randrange(WORDS)
    while len(tokens) < LENGTH:
        if len(tokens) > 1 and tokens[-1] < WORDS and len(tokens) + 2 <= LENGTH \
                and rng.random() < MENTION_RATE:
            k = rng.randrange(NAMES_PER_SEQUENCE)
            mentions.append((len(tokens), k in seen))
            seen.add(k)
            tokens += names[k]
            continue
        nxt, weights = _LANGUAGE[word]
        word = rng.choices(nxt, weights)[0]
        tokens.append(word)
    return tokens, mentions


def make_batch(rng: random.Random, size: int):
    """Training sequences: inputs and labels (every token), [size, LENGTH]."""
    x = torch.tensor([sample(rng)[0] for _ in range(size)])
    return x, x.clone()


def test_set(count: int):
    rng = random.Random(TEST_SEED)
    rows = [sample(rng) for _ in range(count)]
    return torch.tensor([t for t, _ in rows]), [m for _, m in rows]


@torch.no_grad()
def accuracies(model, count: int, batch: int = 250) -> Dict[str, float]:
    """Head 0's argmax, teacher-forced, at the first token of repeated and first name mentions
    (predicting the second token) and at words followed by a word."""
    seqs, mentions = test_set(count)
    hits = {"repeated": [0, 0], "first": [0, 0], "words": [0, 0]}
    for i in range(0, count, batch):
        x = seqs[i:i + batch]
        h, cos, sin = model.trunk_forward(x)
        pred = model.head_logits(0, model.head_forward(0, h, cos, sin)).argmax(-1)
        right = pred[:, :-1] == x[:, 1:]                      # [b, LENGTH - 1]
        for j, ms in enumerate(mentions[i:i + batch]):
            for pos, repeated in ms:
                c = hits["repeated" if repeated else "first"]
                c[0] += int(right[j, pos])
                c[1] += 1
        word_pos = (x[:, :-1] < WORDS) & (x[:, 1:] < WORDS)
        hits["words"][0] += int(right[word_pos].sum())
        hits["words"][1] += int(word_pos.sum())
    return {k: a / max(1, b) for k, (a, b) in hits.items()}


class Task:
    """The experiment runner's view of the task (mtp_ext/experiments/runner.py)."""
    name, title = "induction", "Induction"
    vocab = VOCAB
    max_seq_len = LENGTH
    key_name = "model size (d_model)"
    plot_key = "repeated"
    plot_title = "Induction: second token of a repeated name"
    plot_ylabel = "head-0 accuracy (%)"
    # the runner's defaults: model sizes (d_model), trunk layers, steps, n, AdamW lr, batch
    sizes, layers, steps, heads, lr, batch_size = [64, 128], 2, 600, [1, 2], 2e-3, 32

    def __init__(self, test_count: int = 500):
        self.test_count = test_count

    def settings(self) -> dict:
        return dict(words=WORDS, names=NAMES, length=LENGTH, names_per_sequence=NAMES_PER_SEQUENCE,
                    mention_rate=MENTION_RATE, successors=SUCCESSORS, test_count=self.test_count)

    def batch(self, rng: random.Random, size: int):
        return make_batch(rng, size)

    def evaluate(self, model) -> Dict[str, float]:
        return accuracies(model, self.test_count)

    def columns(self):
        return [("repeated", "name, repeated mention"),
                ("first", f"name, first mention (chance {100 / NAMES:.1f})"),
                ("words", "next word")]

    def describe(self) -> str:
        return (f"Induction (Gloeckle et al. 2024, sec. 4.1) on offline synthetic text: a fixed "
                f"random bigram language over {WORDS} word tokens ({SUCCESSORS} likely successors "
                f"per word), sequences of {LENGTH} tokens with {NAMES_PER_SEQUENCE} names of two "
                f"tokens each (from {NAMES} name tokens; first tokens distinct within a sequence, "
                f"second tokens random) inserted after a word with probability {MENTION_RATE}; "
                f"labels on every token. Tested on {self.test_count} held-out sequences (another "
                f"random stream than every training seed's), teacher-forced: head 0's argmax "
                f"accuracy on the second token of a name at its repeated mentions (induction), "
                f"at first mentions (a control) and on words.")
