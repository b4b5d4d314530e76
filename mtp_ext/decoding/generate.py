"""Decoding with an MTP model: plain or self-speculative, greedy or sampled.

Self-speculative decoding (blockwise parallel decoding, Stern et al. 2018): each step feeds the
next token and the drafts of heads 1..n-1 for the tokens after it, and keeps the longest run of
drafts that the next-token head confirms, verifying and drafting in one forward pass. Greedy,
a draft is confirmed when it is head 0's choice; sampled (temperature > 0), by speculative
sampling (Leviathan et al. 2023, Chen et al. 2023): draft x, drawn from its head's distribution
q, is kept with probability min(1, p(x) / q(x)), p being head 0's distribution at that place,
and the first rejected one is replaced by a draw from max(0, p - q), normalized. Either way the
output has the distribution of plain decoding (greedy: the same tokens).

In a batch each sequence advances by its own accepted run and leaves the batch when it is done,
where the model takes positions per sequence (`per_row_positions`, as MTPTransformer does);
another model (mtp_ext.hf's adapter) decodes the sequences of a batch one at a time.

A model offers: cfg.n_future, cfg.max_seq_len, new_caches(B), and forward_cached(ids [B, T],
caches, heads, positions) -> logits [heads, B, T, V] of the T new tokens after `positions`
[B] tokens already in the caches (per_row_positions) or after caches[0].length (then
caches[i].truncate(length) forgets positions past a length).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import cost_model
from .cost_model import Plan, draft_statistics, ordered_paths


@dataclass
class GenerateOutput:
    tokens: torch.Tensor        # [B, P + new_tokens]: prompt and generated tokens; after a
                                # sequence's stop token the stop token repeats; with prompts of
                                # different lengths, sequence b is tokens[b, :lengths[b]], padded
                                # after it with the stop token (0 without one)
    new_tokens: int             # tokens generated per sequence (the most of any sequence)
    forward_passes: int         # model forwards, the prompt's included
    wall_seconds: float
    head_proposed: List[int] = field(default_factory=list)  # drafts of head k checked
    head_accepted: List[int] = field(default_factory=list)  # drafts of head k accepted
    lengths: torch.Tensor = None            # [B] prompt + generated tokens of each sequence
                                            # (its own count, a stop token included)
    sequence_tokens: torch.Tensor = None    # [B] tokens generated, until a stop token
    sequence_forwards: torch.Tensor = None  # [B] forwards each sequence took part in
    plan: Optional["PlanRecord"] = None     # planned decoding: what was picked and why

    @property
    def sequences(self) -> torch.Tensor:
        """The tokens, under transformers' name (GenerateDecoderOnlyOutput.sequences)."""
        return self.tokens

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass a sequence took part in (the prompt's forward
        yields the first token), over the batch's sequences."""
        return float(self.sequence_tokens.sum()) / max(1, int(self.sequence_forwards.sum()))

    @property
    def acceptance(self) -> List[float]:
        """Per draft head k = 1..n-1: the share of its checked drafts that were accepted."""
        return [a / p if p else float("nan") for a, p in zip(self.head_accepted, self.head_proposed)]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second, over the batch's sequences."""
        return float(self.sequence_tokens.sum()) / max(self.wall_seconds, 1e-9)

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.forward_passes,
                "tokens_per_forward": self.tokens_per_forward, "wall_seconds": self.wall_seconds,
                "tokens_per_second": self.tokens_per_second, "head_acceptance": self.acceptance}


@dataclass
class PlanRecord:
    """What planned decoding (mtp_ext.decoding.cost_model) did: `runs`, the (batch size, choice,
    steps) of each stretch of steps with one choice; `why`, per batch size met, the choice and
    the expected rates it beat; `expected_tokens_per_second` over the batch at its first size;
    `timing_seconds`, spent measuring step times (0 when cached; not in wall_seconds)."""
    runs: List[tuple] = field(default_factory=list)
    why: Dict[int, str] = field(default_factory=dict)
    expected_tokens_per_second: float = 0.0
    timing_seconds: float = 0.0

    def summary(self) -> str:
        return ", then ".join(f"{name} at batch {B} ({k} steps)" for B, name, k in self.runs)


class _Sampler:
    """Greedy (temperature 0) or sampling from softmax(logits / temperature) over the top_k
    tokens and the smallest set whose probability reaches top_p (nucleus sampling)."""

    def __init__(self, temperature: float, top_k: Optional[int], generator, top_p: float = 1.0):
        self.temperature, self.top_k, self.generator = temperature, top_k, generator
        self.top_p = top_p

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits):
        """logits [..., V] -> the sampling distribution [..., V] (float32)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p < 1.0:  # keep each token whose more likely ones hold less than top_p
            sorted_p, order = probs.sort(-1, descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs):
        """probs [A, V] -> token ids [A]."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def pick(self, logits):
        """logits [A, V] -> token ids [A]."""
        return logits.argmax(-1) if self.greedy else self.draw(self.probs(logits))

    def uniform(self, shape, device):
        return torch.rand(shape, generator=self.generator, device=device)


DRAFT_TREE_NODES = 24  # a calibrated tree's size: tokens per forward vs a step's cost, measured
                       # on the default model (docs/model.md)


class DraftTree:
    """Candidate tree of greedy tree drafting (Medusa, Cai et al. 2024; EAGLE): paths of ranks,
    (r1, ..., rd) the candidate whose token at depth k is draft head k's r_k-th most likely
    token (k = 1..d), every path's prefixes in the tree too. Node 0 is the root (the next token,
    decided); nodes are ordered by depth. `calibrate_tree` picks the paths from measured ranks."""

    def __init__(self, paths, n_future: int):
        paths = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        for p in paths:
            if not 1 <= len(p) <= n_future - 1 or min(p) < 0:
                raise ValueError(f"tree: path {p} must have 1..{n_future - 1} ranks >= 0 "
                                 f"(n_future = {n_future})")
            if len(p) > 1 and p[:-1] not in paths:
                raise ValueError(f"tree: path {p} lacks its prefix {p[:-1]}")
        self.paths = paths
        index = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
        T = len(paths) + 1
        self.depth = torch.tensor([0] + [len(p) for p in paths])
        self.parent = torch.tensor([-1] + [index[p[:-1]] for p in paths])
        self.rank = torch.tensor([0] + [p[-1] for p in paths])
        self.visible = torch.eye(T, dtype=torch.bool)
        for i, p in enumerate(paths, 1):
            for d in range(len(p)):
                self.visible[i, index[p[:d]]] = True
        self.levels = [torch.nonzero(self.depth == d).squeeze(1)
                       for d in range(1, int(self.depth.max()) + 1)]
        self.top = [1 + max((p[k - 1] for p in paths if len(p) >= k), default=-1)
                    for k in range(1, n_future)]  # candidates needed from draft head k

    def __len__(self):
        return len(self.paths)

    def to(self, device) -> "DraftTree":
        """A copy on device."""
        self = copy.copy(self)
        for name in ("depth", "parent", "rank", "visible"):
            setattr(self, name, getattr(self, name).to(device))
        self.levels = [x.to(device) for x in self.levels]
        return self

    def accept(self, toks, best):
        """Greedy verification. toks [A, T]: the tree's tokens; best [A, T]: head 0's token after
        each node. From the root, keeps the child whose token is best's at the node kept so far,
        while there is one. Returns the kept nodes [A, m] (root first; past a sequence's run its
        last node repeats), the run [A] of kept drafts, and per depth the sequences that
        reached its parent level and that kept a node there ([depth] each)."""
        cur = torch.zeros_like(toks[:, 0])
        run = torch.zeros_like(cur)
        going = torch.ones_like(cur, dtype=torch.bool)
        path, reached, kept = [cur], [], []
        for nodes in self.levels:  # a child of cur with greedy's token
            want = best.gather(1, cur[:, None])                  # greedy's token after cur
            match = (self.parent[nodes] == cur[:, None]) & (toks[:, nodes] == want)
            found = going & match.any(1)
            reached.append(going.sum())
            kept.append(found.sum())
            cur = torch.where(found, nodes[match.long().argmax(1)], cur)
            run, going = run + found, found
            path.append(cur)
        return (torch.stack(path, 1)[:, :int(run.max()) + 1], run, torch.stack(reached),
                torch.stack(kept))

    def tokens(self, nxt, draft_logits):
        """nxt [A] (the root), draft_logits [n-1, A, V] -> the tree's tokens [A, T]."""
        out = torch.empty(nxt.shape[0], len(self) + 1, dtype=nxt.dtype, device=nxt.device)
        out[:, 0] = nxt
        for k, nodes in enumerate(self.levels, 1):  # head k's candidates at depth k
            cand = draft_logits[k - 1].topk(self.top[k - 1], dim=-1).indices   # [A, top]
            out[:, nodes] = cand[:, self.rank[nodes]]
        return out


def chain(n_future: int) -> "DraftTree":
    """The tree of blockwise drafting: each draft head's top token, one path."""
    return DraftTree([(0,) * d for d in range(1, n_future)], n_future)


@torch.no_grad()
def draft_ranks(model, prompts, new_tokens: int = 64) -> torch.Tensor:
    """On greedy continuations of prompts [P, L]: per position, the rank that each draft head
    k gives the token greedy decoding then produces k + 1 places ahead, [N, n-1]."""
    n = model.cfg.n_future
    rows = []
    for p in prompts:
        seq = generate(model, p[None], new_tokens).tokens
        logits = model.forward_cached(seq, model.new_caches(1))                 # [n, 1, S, V]
        start, S = p.shape[0] - 1, seq.shape[1]
        ranks = []
        for k in range(1, n):  # head k at position t drafts the token at t + k + 1
            t = torch.arange(start, S - 1 - k, device=seq.device)
            lg = logits[k, 0, t].float()
            ranks.append((lg > lg.gather(1, seq[0, t + k + 1, None])).sum(1))
        m = min(r.numel() for r in ranks)
        rows.append(torch.stack([r[:m] for r in ranks], 1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, max(n - 1, 0), dtype=torch.long)


def calibrate_draft(model, prompts, new_tokens: int = 64) -> List[List[tuple]]:
    """draft_ranks of each of prompts [P, L], as rank rows (the cost model's acceptance,
    mtp_ext.decoding.cost_model)."""
    return draft_statistics([draft_ranks(model, p[None], new_tokens) for p in prompts])


def calibrate_tree(model, prompts, nodes: int = 16, new_tokens: int = 64) -> List[tuple]:
    """The `nodes` most frequent rank paths (prefixes first on ties) on greedy continuations
    of prompts [P, L] (draft_ranks): the tree that accepts the most tokens per forward on such
    text, for its size."""
    return ordered_paths(calibrate_draft(model, prompts, new_tokens), nodes)


def _tree(model, tree, speculative, temperature, room: int):
    """The DraftTree of greedy tree drafting, or None (plain decoding, speculative sampling, a
    model without forward_tree: blockwise drafting by forward_cached). room: the cache slots
    left after the prompt and the new tokens; the model's own tree gives way to the chain where
    it does not fit."""
    can = hasattr(model, "forward_tree") and not getattr(model, "sequential", False)
    if tree is not None and getattr(model, "sequential", False):
        raise ValueError("tree: sequential MTP modules draft one chain (module k from module "
                         "k-1's draft); pass tree=None")
    if tree is not None:
        if not speculative:
            raise ValueError("tree applies to speculative decoding: pass speculative=True")
        if temperature > 0:
            raise ValueError(f"tree drafting is greedy; temperature {temperature} samples with "
                             f"one draft per head: pass tree=None")
        if not can:
            raise ValueError(f"tree: {type(model).__name__} has no forward_tree")
    if not speculative or temperature > 0 or not can or model.cfg.n_future < 2:
        return None
    if tree is None:
        tree = getattr(model, "draft_tree", None)
        if not tree or len(tree) + 1 > room:
            tree = chain(model.cfg.n_future)
    return tree if isinstance(tree, DraftTree) else DraftTree(tree, model.cfg.n_future)


def _check(model, input_ids, max_new_tokens, speculative, temperature, top_k, prompt_lengths,
           tree=None):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, P] with P >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, P = input_ids.shape
    extra = max(model.cfg.n_future, len(tree) + 1) if tree is not None else (
        model.cfg.n_future if speculative else 1)
    if P + max_new_tokens + extra > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) + {extra} exceeds "
                         f"max_seq_len {model.cfg.max_seq_len}")
    if prompt_lengths is None:
        return torch.full((B,), P, dtype=torch.long)
    lens = torch.as_tensor(prompt_lengths, dtype=torch.long).cpu()
    if lens.shape != (B,) or bool((lens < 1).any()) or bool((lens > P).any()):
        raise ValueError(f"prompt_lengths must be [B] = [{B}] values in [1, {P}], got "
                         f"{lens.tolist()}")
    return lens


def generate(model, input_ids, max_new_tokens: int, *, speculative: bool = False,
             stop_token=None, temperature: float = 0.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             prompt_lengths=None, tree=None, top_p: float = 1.0, plan=None) -> GenerateOutput:
    """input_ids [B, P]: prompts (right-padded when prompt_lengths [B] gives their lengths).
    Each sequence gets max_new_tokens tokens, or fewer up to and including its first stop token
    (stop_token: a token id or several; after a stop the first of them repeats).
    tree (greedy speculative decoding, a model with forward_tree): a DraftTree or its rank
    paths; default the model's `draft_tree` when it has one, else each head's top draft.
    plan (greedy speculative decoding without a tree given): None (default) picks the tree,
    the chain or plain steps per batch size from the cost model (mtp_ext.decoding.cost_model)
    where the model has calibrated `draft_stats`, else decodes as above; False never; True
    requires it; or a cost_model.Plan to use."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    room = model.cfg.max_seq_len - input_ids.shape[-1] - max_new_tokens
    planned = _wants_plan(model, plan, tree, speculative, temperature)
    tree = None if planned else _tree(model, tree, speculative, temperature, room)
    lens = _check(model, input_ids, max_new_tokens, speculative, temperature, top_k,
                  prompt_lengths, tree)
    B = input_ids.shape[0]
    if B > 1 and not getattr(model, "per_row_positions", False):
        outs = [generate(model, input_ids[b:b + 1, :int(lens[b])], max_new_tokens,
                         speculative=speculative, stop_token=stop_token,
                         temperature=temperature, top_k=top_k, generator=generator, top_p=top_p)
                for b in range(B)]
        return _stack(outs, stop_token)
    was_training = model.training
    model.eval()
    try:
        secs = 0.0
        if planned and not isinstance(plan, Plan):
            plan, secs = _plan(model, B, room)
        out = _decode(model, input_ids, lens, max_new_tokens, speculative, stop_token,
                      _Sampler(temperature, top_k, generator, top_p), tree,
                      plan if planned else None)
        if out.plan is not None:
            out.plan.timing_seconds = secs
        return out
    finally:
        model.train(was_training)


def _wants_plan(model, plan, tree, speculative, temperature) -> bool:
    """Whether decoding is planned by the cost model (generate's `plan`)."""
    if plan is not None and not isinstance(plan, (bool, Plan)):
        raise ValueError(f"plan must be None, True, False or a cost_model.Plan, got {plan!r}")
    if plan is False:
        return False
    able = (speculative and temperature <= 0 and tree is None and model.cfg.n_future > 1
            and hasattr(model, "forward_tree") and not getattr(model, "sequential", False)
            and getattr(model, "per_row_positions", False))
    if plan is None:
        return able and bool(getattr(model, "draft_stats", None))
    if not able:
        raise ValueError("plan: planned decoding is greedy speculative decoding (speculative="
                         "True, temperature 0, tree=None) of a model with forward_tree")
    if plan is True and not getattr(model, "draft_stats", None):
        raise ValueError(f"plan=True: {type(model).__name__} has no draft_stats (calibrate "
                         f"them: mtp_ext.decoding.generate.calibrate_draft)")
    return True


def _stop_tokens(stop_token) -> List[int]:
    """stop_token (None, a token id or several) as a list of ids."""
    if stop_token is None:
        return []
    if isinstance(stop_token, int) or (torch.is_tensor(stop_token) and stop_token.dim() == 0):
        return [int(stop_token)]
    return [int(t) for t in stop_token]


def _stack(outs, stop_token) -> GenerateOutput:
    """One GenerateOutput of a batch from those of its sequences decoded one at a time."""
    width = max(o.tokens.shape[1] for o in outs)
    pad = (_stop_tokens(stop_token) or [0])[0]
    tokens = torch.full((len(outs), width), pad, dtype=outs[0].tokens.dtype,
                        device=outs[0].tokens.device)
    for b, o in enumerate(outs):
        tokens[b, :o.tokens.shape[1]] = o.tokens[0]
    cat = lambda name: torch.cat([getattr(o, name) for o in outs])
    return GenerateOutput(tokens, max(o.new_tokens for o in outs),
                          sum(o.forward_passes for o in outs), sum(o.wall_seconds for o in outs),
                          [sum(x) for x in zip(*(o.head_proposed for o in outs))],
                          [sum(x) for x in zip(*(o.head_accepted for o in outs))],
                          cat("lengths"), cat("sequence_tokens"), cat("sequence_forwards"))


class _Decoding:
    """One batch's decoding between steps: the active sequences (`rows`, their indices in the
    batch; finished ones leave), how many tokens each has cached (`pos`), the decided next
    token of each (`nxt`, already emitted) and the logits it was decided from (`last`: the heads'
    logits at that place), the tokens made so far, and the tallies of the output."""

    def __init__(self, model, input_ids, max_new, heads, stop_token, sampler):
        self.model, self.heads, self.sampler = model, heads, sampler
        stops = _stop_tokens(stop_token)
        self.stop = torch.tensor(stops, device=input_ids.device) if stops else None
        self.max_new = max_new
        n, dev = model.cfg.n_future, input_ids.device
        B = input_ids.shape[0]
        self.per_row = getattr(model, "per_row_positions", False)
        self.caches = model.new_caches(B)
        self.pad = stops[0] if stops else 0
        self.gen = torch.full((B, max_new + n), self.pad, dtype=input_ids.dtype, device=dev)
        self.made = torch.zeros(B, dtype=torch.long, device=dev)  # a stop token included
        self.fwd = torch.zeros(B, dtype=torch.long, device=dev)   # forwards per sequence
        self.proposed = torch.zeros(max(n - 1, 0), dtype=torch.long, device=dev)
        self.accepted = torch.zeros(max(n - 1, 0), dtype=torch.long, device=dev)
        self.forwards = 0
        self.rows = torch.arange(B, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.last = self.nxt = None
        self.drafts = None  # [A, n-1]: drafts made before the step (sequential MTP modules)
        self.trunk = None   # [A, g, D]: the trunk's outputs of plain steps the draft heads lack

    def forward(self, ids):
        """The model on ids [A, T] after each active sequence's cached tokens."""
        self.forwards += 1
        self.fwd[self.rows] += 1
        if self.per_row:
            return self.model.forward_cached(ids, self.caches, self.heads, positions=self.pos)
        for c in self.caches:  # one sequence: cut back to its length
            c.truncate(int(self.pos[0]))
        return self.model.forward_cached(ids, self.caches, self.heads)

    def emit(self, tok, count):
        """Appends the first count[a] tokens of tok [A, m] to active sequence a, at most up to
        max_new and up to its first stop token; returns which sequences go on."""
        m, dev = tok.shape[1], tok.device
        made = self.made[self.rows]
        j = torch.arange(m, device=dev)
        take = j[None, :] < torch.minimum(count, self.max_new - made)[:, None]
        hit = torch.zeros_like(take[:, 0])
        if self.stop is not None:  # nothing after the first stop token
            is_stop = torch.isin(tok, self.stop) & take
            take = take & ((is_stop.long().cumsum(1) - is_stop.long()) == 0)
            hit = is_stop.any(1)
        # integer indices only (no boolean mask: no host synchronisation); made + j < max_new + n
        r, at = self.rows[:, None].expand(-1, m), made[:, None] + j[None, :]
        self.gen[r, at] = torch.where(take, tok, self.gen[r, at])
        self.made[self.rows] += take.sum(1)
        return ~hit & (self.made[self.rows] < self.max_new)

    def keep(self, alive) -> bool:
        """Finished sequences leave the batch; False when none is left."""
        if bool(alive.all()):  # a host synchronisation per step
            return True
        keep = alive.nonzero().squeeze(1)
        if keep.numel() == 0:
            return False
        self.rows, self.pos, self.nxt = self.rows[keep], self.pos[keep], self.nxt[keep]
        self.last = self.last[:, keep]
        if self.drafts is not None:
            self.drafts = self.drafts[keep]
        if self.trunk is not None:
            self.trunk = self.trunk[keep]
        for c in self.caches:
            c.select(keep)
        return True

    def output(self, input_ids, lens, wall) -> GenerateOutput:
        B, P = input_ids.shape
        new = int(self.made.max()) if B else 0
        tokens = torch.full((B, P + new), self.pad, dtype=input_ids.dtype, device=input_ids.device)
        for b in range(B):  # each prompt, then its tokens (the stop token repeating after a stop)
            L = int(lens[b])
            tokens[b, :L] = input_ids[b, :L]
            tokens[b, L:L + new] = self.gen[b, :new]
        return GenerateOutput(tokens, new, self.forwards, wall, self.proposed.tolist(),
                              self.accepted.tolist(), lens.to(self.made.device) + self.made,
                              self.made, self.fwd)


def _prefill(s: _Decoding, input_ids, lens):
    """The prompts' forward: every head's logits at each prompt's last token; the first token."""
    s.last = s.forward(input_ids)[:, s.rows, lens.to(s.rows.device) - 1]
    s.pos = lens.to(s.rows.device)
    s.nxt = s.sampler.pick(s.last[0])
    return s.emit(s.nxt[:, None], torch.ones_like(s.nxt))


def _plain_step(s: _Decoding):
    """One token per sequence: the next-token head on the last decided token."""
    s.last = s.forward(s.nxt[:, None])[:, :, 0]
    s.pos = s.pos + 1
    s.nxt = s.sampler.pick(s.last[0])
    return s.emit(s.nxt[:, None], torch.ones_like(s.nxt))


def _drafts(s: _Decoding):
    """The drafts to verify [A, n-1] and, sampling, their distributions q [n-1, A, V]: each
    head's top or a draw from it, from the draft logits s.last[1:]; sequential MTP modules
    drew theirs as they drafted (s.drafts: module k reads module k-1's draft)."""
    sampler, n = s.sampler, s.model.cfg.n_future
    q = None if sampler.greedy else sampler.probs(s.last[1:])             # [n-1, A, V]
    if s.drafts is not None:
        return s.drafts, q
    drafts = (s.last[1:].argmax(-1) if q is None else
              torch.stack([sampler.draw(q[i]) for i in range(n - 1)])).t()  # [A, n-1]
    return drafts, q


def _accept(s: _Decoding, drafts, q, head0):
    """The run of drafts that head 0 confirms, head0 [A, n, V] being its logits after each of
    the block [next token, drafts] (greedy: equal to its choice; sampled: speculative
    sampling); tallies the checked and accepted drafts per head and sets s.nxt, head 0's token
    after the run. Returns the run [A]."""
    n, sampler = s.model.cfg.n_future, s.sampler
    ar = torch.arange(drafts.shape[0], device=drafts.device)
    # draft i (block index i + 1) is checked by head 0 after the block's first i + 1 tokens
    if q is None:
        ok = drafts == head0[:, :-1].argmax(-1)
    else:
        p = sampler.probs(head0)                                          # [A, n, V]
        p_d = p[:, :-1].gather(2, drafts[:, :, None]).squeeze(2)          # [A, n-1]
        q_d = q.permute(1, 0, 2).gather(2, drafts[:, :, None]).squeeze(2)
        ok = sampler.uniform(p_d.shape, p_d.device) * q_d < p_d           # u < p(x) / q(x)
    run = ok.long().cumprod(1).sum(1)                                     # drafts accepted
    checked = run[:, None] >= torch.arange(n - 1, device=run.device)
    s.proposed += checked.sum(0)
    s.accepted += (checked & ok).sum(0)
    # the next token: head 0 after the last kept one; sampled, the first rejected draft's place
    # takes a draw from max(0, p - q), normalized
    if q is None:
        s.nxt = head0[ar, run].argmax(-1)
    else:
        p_next = p[ar, run]
        q_next = q.permute(1, 0, 2)[ar, run.clamp(max=n - 2)]
        resid = torch.where((run < n - 1)[:, None], (p_next - q_next).clamp(min=0), p_next)
        resid = torch.where(resid.sum(1, keepdim=True) > 0, resid, p_next)  # p = q: p
        s.nxt = sampler.draw(resid / resid.sum(1, keepdim=True))
    return run


def _blockwise_step(s: _Decoding):
    """The next token and one draft per head (each head's top, or drawn from it when sampling)
    in one forward; the run of drafts that head 0 confirms is kept, then head 0's token after
    the run. The same forward gives every head's logits after the run: the next drafts."""
    drafts, q = _drafts(s)
    logits = s.forward(torch.cat([s.nxt[:, None], drafts], 1))            # [n, A, n, V]
    run = _accept(s, drafts, q, logits[0])
    s.last = logits[:, torch.arange(run.numel(), device=run.device), run]
    s.pos = s.pos + 1 + run
    alive = s.emit(drafts, run)
    return alive & s.emit(s.nxt[:, None], alive.long())


def _sequential_prefill(s: _Decoding, input_ids, lens):
    """The prompts' forward (trunk and head 0), the first token, then the MTP modules' first
    chain of drafts over the whole prompts."""
    model, rows = s.model, s.rows
    lens = lens.to(rows.device)
    s.forwards += 1
    s.fwd[rows] += 1
    head0 = model.sequential_verify(input_ids, s.caches, torch.zeros_like(lens))  # [A, P, V]
    first = head0[rows, lens - 1]
    s.pos, s.nxt = lens, s.sampler.pick(first)
    alive = s.emit(s.nxt[:, None], torch.ones_like(s.nxt))
    s.drafts, chain_logits = model.sequential_draft(s.caches, lens - 1, s.nxt,
                                                    input_ids.shape[1], s.sampler.pick)
    s.last = torch.cat([first[None], chain_logits])
    return alive


def _sequential_step(s: _Decoding):
    """Sequential MTP modules: head 0 verifies the block [next token, drafts] as in
    _blockwise_step; then the modules draft the next chain after the run (module k from
    module k-1's draft), recomputing the positions whose cache entries read a draft."""
    model, n = s.model, s.model.cfg.n_future
    drafts, q = _drafts(s)
    s.forwards += 1
    s.fwd[s.rows] += 1
    head0 = model.sequential_verify(torch.cat([s.nxt[:, None], drafts], 1), s.caches, s.pos)
    run = _accept(s, drafts, q, head0)
    last = s.pos + run                     # the last kept token's position: the modules read it
    s.drafts, chain_logits = model.sequential_draft(s.caches, last, s.nxt,
                                                    int(run.max()) + n - 1, s.sampler.pick)
    s.last = torch.cat([head0[torch.arange(run.numel(), device=run.device), run][None],
                        chain_logits])
    s.pos = last + 1
    alive = s.emit(drafts, run)
    return alive & s.emit(s.nxt[:, None], alive.long())


class _TreeSteps:
    """Greedy tree drafting (a model with forward_tree): each step verifies the candidate tree
    after the next token and keeps its longest confirmed path. While every sequence keeps all
    its drafts along the top ones, the next step verifies just those (the chain: fewer tokens);
    otherwise the whole tree (step_down=False: always the tree). `last` holds the draft
    heads' logits only."""

    def __init__(self, tree: DraftTree, n: int, device, step_down: bool = True):
        self.tree = tree.to(device)
        self.top = chain(n).to(device) if step_down else self.tree
        self.use = self.tree

    def __call__(self, s: _Decoding):
        model, use, n = s.model, self.use, s.model.cfg.n_future
        ar = torch.arange(s.rows.numel(), device=s.rows.device)
        toks = use.tokens(s.nxt, s.last)                                  # [A, T]
        s.forwards += 1
        s.fwd[s.rows] += 1
        head0, x = model.forward_tree(toks, s.caches, s.pos, use.depth, use.visible)
        best = head0.argmax(-1)            # [A, T]: greedy's token after each node
        path, run, reached, kept = use.accept(toks, best)
        self.use = self.top if bool((run == n - 1).all() and (use.rank[path] == 0).all()) \
            else self.tree
        s.proposed[:len(reached)] += reached
        s.accepted[:len(kept)] += kept
        model.commit_path(s.caches, s.pos, path)
        s.last = model.draft_forward(x[ar[:, None], path], s.caches, s.pos)[:, ar, run]
        s.nxt = best[ar, path[ar, run]]
        s.pos = s.pos + 1 + run
        out = torch.cat([toks.gather(1, path[:, 1:]), s.nxt[:, None]], 1)  # kept drafts, next
        return s.emit(out.scatter_(1, run[:, None], s.nxt[:, None]), run + 1)


def _trunk_step(s: _Decoding):
    """A plain step that keeps the trunk's output (s.trunk) for the draft heads to catch up on
    when planned decoding drafts again."""
    model, dev = s.model, s.rows.device
    head0, x = model.forward_tree(s.nxt[:, None], s.caches, s.pos,
                                  torch.zeros(1, dtype=torch.long, device=dev),
                                  torch.ones(1, 1, dtype=torch.bool, device=dev))
    s.forwards += 1
    s.fwd[s.rows] += 1
    s.trunk = x if s.trunk is None else torch.cat([s.trunk, x], 1)
    s.last = head0.transpose(0, 1)                                        # [1, A, V]
    s.pos = s.pos + 1
    s.nxt = head0[:, 0].argmax(-1)
    return s.emit(s.nxt[:, None], torch.ones_like(s.nxt))


class _PlannedSteps:
    """Greedy decoding whose step is chosen per batch size by a cost model (Plan): tree steps of
    the chosen tree, or plain steps; re-chosen when sequences leave. Plain steps keep the
    trunk's outputs, which the draft heads run on before the next tree step (their cache and
    logits catch up)."""

    def __init__(self, plan: Plan, n: int, device, record: PlanRecord):
        self.plan, self.n, self.device, self.record = plan, n, device, record
        self.steps: dict = {}
        self.again: dict = {}  # per batch size: whether a smaller one drafts

    def __call__(self, s: _Decoding):
        B = s.rows.numel()
        c = self.plan.choose(B)
        if B not in self.record.why:
            self.record.why[B] = self.plan.why(B)
        runs = self.record.runs
        if runs and runs[-1][:2] == (B, c.name):
            runs[-1] = (B, c.name, runs[-1][2] + 1)
        else:
            runs.append((B, c.name, 1))
        if c.paths is None:  # plain; keeping the trunk's outputs where drafting may come back
            again = self.again.setdefault(B, any(self.plan.choose(b).paths for b in range(1, B))
                                          and _may_leave_early(s))
            if again:
                return _trunk_step(s)
            s.heads = 1  # for good: head 0 alone, the draft heads' cache left behind
            return _plain_step(s)
        if s.trunk is not None:  # after plain steps: the draft heads on the positions they lack
            g = s.trunk.shape[1]
            s.last = s.model.draft_forward(s.trunk, s.caches, s.pos - g)[:, :, -1]
            s.trunk = None
        if c.name not in self.steps:
            self.steps[c.name] = _TreeSteps(DraftTree(c.paths, self.n), self.n, self.device,
                                            step_down=False)
        return self.steps[c.name](s)


def _may_leave_early(s: _Decoding) -> bool:
    """Whether a sequence can end before the others: with stop tokens, or when they have made
    different numbers of tokens (plain steps make one for each). Otherwise plain decoding ends
    them all at once, and the batch never shrinks to a size that drafts."""
    made = s.made[s.rows]
    return s.stop is not None or bool((made != made[0]).any())


def _plan(model, batch: int, room: int):
    """The cost model of greedy speculative decoding for this model (with draft_stats) and
    batch size, and the seconds spent timing steps."""
    stats = model.draft_stats
    paths = ordered_paths(stats)
    cap = min(room - 1, cost_model.timing_room(model))
    times, secs = cost_model.step_times(model, batch, paths, cap)
    return Plan(stats, times, model.cfg.n_future, min(cap, len(paths))), secs


def _decode(model, input_ids, lens, max_new, speculative, stop_token, sampler,
            tree=None, plan=None) -> GenerateOutput:
    """Prefill, then steps until every sequence is done: tree drafting, blockwise drafting
    (the chain by forward_cached; greedy or sampled), the chain of sequential MTP modules, or
    plain decoding."""
    n = model.cfg.n_future
    spec = speculative and n > 1
    t0 = time.perf_counter()
    s = _Decoding(model, input_ids, max_new, n if spec else 1, stop_token, sampler)
    if spec and getattr(model, "sequential", False):
        alive, step = _sequential_prefill(s, input_ids, lens), _sequential_step
    elif plan is not None:
        record = PlanRecord()
        if plan.choose(input_ids.shape[0]).paths is None and not _may_leave_early(s):
            s.heads = 1  # plain, and all end together: plain throughout, head 0 alone
        alive = _prefill(s, input_ids, lens)
        step, s.last = _PlannedSteps(plan, n, input_ids.device, record), s.last[1:]
        B = input_ids.shape[0]
        record.expected_tokens_per_second = B * plan.choose(B).rate
    elif tree is not None:
        alive = _prefill(s, input_ids, lens)
        step, s.last = _TreeSteps(tree, n, input_ids.device), s.last[1:]
    else:
        alive = _prefill(s, input_ids, lens)
        step = _blockwise_step if spec else _plain_step
    while s.keep(alive):
        alive = step(s)
    out = s.output(input_ids, lens, time.perf_counter() - t0)
    if plan is not None:
        out.plan = record
    return out
