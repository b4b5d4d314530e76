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
from typing import List, Optional

import torch


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
    sequence_tokens: torch.Tensor = None    # [B] tokens generated, until a stop token
    sequence_forwards: torch.Tensor = None  # [B] forwards each sequence took part in

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass a sequence took part in (the prompt's forward
        yields the first token), over the batch's sequences."""
        return float(self.sequence_tokens.sum()) / max(1, int(self.sequence_forwards.sum()))

    @property
    def acceptance(self) -> List[float]:
        """Per draft head k = 1..n-1: the share of its checked drafts that were accepted."""
        return [a / p if p else float("nan") for a, p in zip(self.head_accepted, self.head_proposed)]

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.forward_passes,
                "tokens_per_forward": self.tokens_per_forward, "wall_seconds": self.wall_seconds,
                "tokens_per_second": float(self.sequence_tokens.sum()) / max(self.wall_seconds, 1e-9),
                "head_acceptance": self.acceptance}


class _Sampler:
    """Greedy (temperature 0) or sampling from softmax(logits / temperature) over the top_k."""

    def __init__(self, temperature: float, top_k: Optional[int], generator):
        self.temperature, self.top_k, self.generator = temperature, top_k, generator

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits):
        """logits [..., V] -> the sampling distribution [..., V] (float32)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(-1)

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
def calibrate_tree(model, prompts, nodes: int = 16, new_tokens: int = 64) -> List[tuple]:
    """Measures, on greedy continuations of prompts [P, L], the rank that each draft head k
    gives the token greedy decoding then produces k + 1 places ahead, and returns the `nodes`
    most frequent rank paths (prefixes first on ties): the tree that accepts the most tokens per
    forward on such text, for its size."""
    n = model.cfg.n_future
    counts: dict = {}
    for p in prompts:
        seq = generate(model, p[None], new_tokens).tokens
        logits = model.forward_cached(seq, model.new_caches(1))                 # [n, 1, S, V]
        start, S = p.shape[0] - 1, seq.shape[1]
        ranks = []
        for k in range(1, n):  # head k at position t drafts the token at t + k + 1
            t = torch.arange(start, S - 1 - k)
            lg = logits[k, 0, t].float()
            ranks.append((lg > lg.gather(1, seq[0, t + k + 1, None])).sum(1))
        m = min(r.numel() for r in ranks)
        for row in torch.stack([r[:m] for r in ranks], 1).tolist():
            for d in range(1, n):
                counts[tuple(row[:d])] = counts.get(tuple(row[:d]), 0) + 1
    best = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    return best[:nodes]


def _tree(model, tree, speculative, temperature, room: int):
    """The DraftTree of greedy tree drafting, or None (plain decoding, speculative sampling, a
    model without forward_tree: blockwise drafting by forward_cached). room: the cache slots
    left after the prompt and the new tokens; the model's own tree gives way to the chain where
    it does not fit."""
    can = hasattr(model, "forward_tree")
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
             stop_token: Optional[int] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             prompt_lengths=None, tree=None) -> GenerateOutput:
    """input_ids [B, P]: prompts (right-padded when prompt_lengths [B] gives their lengths).
    Each sequence gets max_new_tokens tokens, or fewer up to and including stop_token.
    tree (greedy speculative decoding, a model with forward_tree): a DraftTree or its rank
    paths; default the model's `draft_tree` when it has one, else each head's top draft."""
    tree = _tree(model, tree, speculative, temperature,
                 model.cfg.max_seq_len - input_ids.shape[-1] - max_new_tokens)
    lens = _check(model, input_ids, max_new_tokens, speculative, temperature, top_k,
                  prompt_lengths, tree)
    B = input_ids.shape[0]
    if B > 1 and not getattr(model, "per_row_positions", False):
        outs = [generate(model, input_ids[b:b + 1, :int(lens[b])], max_new_tokens,
                         speculative=speculative, stop_token=stop_token,
                         temperature=temperature, top_k=top_k, generator=generator)
                for b in range(B)]
        return _stack(outs, stop_token)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, lens, max_new_tokens, speculative, stop_token,
                       _Sampler(temperature, top_k, generator), tree)
    finally:
        model.train(was_training)


def _stack(outs, stop_token) -> GenerateOutput:
    """One GenerateOutput of a batch from those of its sequences decoded one at a time."""
    width = max(o.tokens.shape[1] for o in outs)
    pad = 0 if stop_token is None else stop_token
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


def _decode(model, input_ids, lens, max_new, speculative, stop_token, sampler,
            tree=None) -> GenerateOutput:
    n = model.cfg.n_future
    B, P = input_ids.shape
    dev = input_ids.device
    per_row = getattr(model, "per_row_positions", False)
    spec = speculative and n > 1
    heads = n if spec else 1
    t0 = time.perf_counter()
    caches = model.new_caches(B)
    tree = None if tree is None else tree.to(dev)
    top = chain(n).to(dev) if tree is not None else None  # each head's top draft only
    use = tree

    def forward(ids, pos):  # pos [A]: tokens already cached of each active sequence
        if per_row:
            return model.forward_cached(ids, caches, heads, positions=pos)
        for c in caches:  # one sequence: cut back to its length
            c.truncate(int(pos[0]))
        return model.forward_cached(ids, caches, heads)

    pad = 0 if stop_token is None else stop_token
    gen = torch.full((B, max_new + n), pad, dtype=input_ids.dtype, device=dev)
    made = torch.zeros(B, dtype=torch.long, device=dev)  # tokens generated, a stop token included
    fwd = torch.ones(B, dtype=torch.long, device=dev)    # forwards each sequence took part in
    proposed = torch.zeros(max(n - 1, 0), dtype=torch.long, device=dev)
    accepted = torch.zeros(max(n - 1, 0), dtype=torch.long, device=dev)
    steps = torch.arange(max(n - 1, 0), device=dev)
    rows = torch.arange(B, device=dev)  # original index of each active sequence
    pos = lens.to(dev)                  # tokens cached of each active sequence

    def emit(tok, count):
        """Appends the first count[a] tokens of tok [A, m] to active sequence a, at most up to
        max_new and up to its first stop token; returns which sequences go on."""
        m = tok.shape[1]
        j = torch.arange(m, device=dev)
        take = j[None, :] < torch.minimum(count, max_new - made[rows])[:, None]
        hit = torch.zeros_like(take[:, 0])
        if stop_token is not None:  # nothing after the first stop token
            is_stop = (tok == stop_token) & take
            take = take & ((is_stop.long().cumsum(1) - is_stop.long()) == 0)
            hit = is_stop.any(1)
        at = made[rows][:, None] + j[None, :]
        gen[rows[:, None].expand(-1, m)[take], at[take]] = tok[take]
        made[rows] += take.sum(1)
        return ~hit & (made[rows] < max_new)

    forwards = 1
    last = forward(input_ids, torch.zeros(B, dtype=torch.long, device=dev))[:, rows, pos - 1]
    nxt = sampler.pick(last[0])  # the next token of each active sequence, decided and emitted
    alive = emit(nxt[:, None], torch.ones_like(nxt))
    if tree is not None:  # tree drafting keeps the draft heads' logits only
        last = last[1:]
    while True:
        if not bool(alive.all()):  # finished sequences leave the batch
            keep = alive.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, pos, last, nxt = rows[keep], pos[keep], last[:, keep], nxt[keep]
            for c in caches:
                c.select(keep)
        if tree is not None:
            ar = torch.arange(rows.numel(), device=dev)
            toks = use.tokens(nxt, last)                                    # [A, T]
            head0, x = model.forward_tree(toks, caches, pos, use.depth, use.visible)
            forwards += 1
            fwd[rows] += 1
            best = head0.argmax(-1)            # [A, T]: greedy's token after each node
            path, run, reached, kept = use.accept(toks, best)
            # while every sequence keeps all its drafts along the top ones, the next step
            # verifies just those (the chain: fewer tokens); otherwise the whole tree
            use = top if bool((run == n - 1).all() and (use.rank[path] == 0).all()) else tree
            proposed[:len(reached)] += reached
            accepted[:len(kept)] += kept
            cur = path[ar, run]
            model.commit_path(caches, pos, path)
            last = model.draft_forward(x[ar[:, None], path], caches, pos)[:, ar, run]
            nxt = best[ar, cur]
            pos = pos + 1 + run
            # the kept drafts, then the next token
            out = torch.cat([toks.gather(1, path[:, 1:]), nxt[:, None]], 1)
            alive = emit(out.scatter_(1, run[:, None], nxt[:, None]), run + 1)
            continue
        if not spec:
            last = forward(nxt[:, None], pos)[:, :, 0]
            forwards += 1
            fwd[rows] += 1
            pos = pos + 1
            nxt = sampler.pick(last[0])
            alive = emit(nxt[:, None], torch.ones_like(nxt))
            continue
        q = None if sampler.greedy else sampler.probs(last[1:])            # [n-1, A, V]
        drafts = (last[1:].argmax(-1) if q is None else
                  torch.stack([sampler.draw(q[i]) for i in range(n - 1)])).t()  # [A, n-1]
        logits = forward(torch.cat([nxt[:, None], drafts], 1), pos)        # [n, A, n, V]
        forwards += 1
        fwd[rows] += 1
        ar = torch.arange(rows.numel(), device=dev)
        # draft i (block index i + 1) is checked by head 0 after the block's first i + 1 tokens
        if q is None:
            ok = drafts == logits[0, :, :-1].argmax(-1)
        else:
            p = sampler.probs(logits[0])                                    # [A, n, V]
            p_d = p[:, :-1].gather(2, drafts[:, :, None]).squeeze(2)        # [A, n-1]
            q_d = q.permute(1, 0, 2).gather(2, drafts[:, :, None]).squeeze(2)
            ok = sampler.uniform(p_d.shape, dev) * q_d < p_d                # u < p(x) / q(x)
        run = ok.long().cumprod(1).sum(1)                                   # drafts accepted
        checked = run[:, None] >= steps
        proposed += checked.sum(0)
        accepted += (checked & ok).sum(0)
        # the next token: head 0 after the last kept one; sampled, the first rejected draft's
        # place takes a draw from max(0, p - q), normalized
        if q is None:
            nxt = logits[0, ar, run].argmax(-1)
        else:
            p_next = p[ar, run]
            q_next = q.permute(1, 0, 2)[ar, run.clamp(max=n - 2)]
            resid = torch.where((run < n - 1)[:, None], (p_next - q_next).clamp(min=0), p_next)
            resid = torch.where(resid.sum(1, keepdim=True) > 0, resid, p_next)  # p = q: p
            nxt = sampler.draw(resid / resid.sum(1, keepdim=True))
        last = logits[:, ar, run]
        pos = pos + 1 + run
        alive = emit(drafts, run)
        alive = alive & emit(nxt[:, None], alive.long())
    wall = time.perf_counter() - t0
    new = int(made.max()) if B else 0
    tokens = torch.full((B, P + new), pad, dtype=input_ids.dtype, device=dev)
    for b in range(B):  # each prompt, then its tokens (the stop token repeating after a stop)
        L = int(lens[b])
        tokens[b, :L] = input_ids[b, :L]
        tokens[b, L:L + new] = gen[b, :new]
    return GenerateOutput(tokens, new, forwards, wall, proposed.tolist(), accepted.tolist(),
                          lens.to(dev) + new, made, fwd)
