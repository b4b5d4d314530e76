"""Decoding with an MTPTransformer: greedy or sampled, and greedy self-speculative decoding
(blockwise parallel decoding, Stern et al. 2018) that drafts with heads 1..n-1 and keeps the
longest prefix the next-token head confirms, verifying and drafting in one forward pass."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class GenerateOutput:
    tokens: torch.Tensor        # [B, P + new]: prompt and generated tokens (after a sequence's
                                # stop token, the stop token repeats)
    new_tokens: int             # tokens generated per sequence
    forward_passes: int         # model forwards, the prompt's included
    wall_seconds: float
    head_proposed: List[int] = field(default_factory=list)  # drafts of head k checked
    head_accepted: List[int] = field(default_factory=list)  # drafts of head k accepted

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass (the prompt's forward yields the first token)."""
        return self.new_tokens / max(1, self.forward_passes)

    @property
    def acceptance(self) -> List[float]:
        """Per draft head k = 1..n-1: the share of its checked drafts that were accepted."""
        return [a / p if p else float("nan") for a, p in zip(self.head_accepted, self.head_proposed)]

    def stats(self) -> dict:
        return {"new_tokens": self.new_tokens, "forward_passes": self.forward_passes,
                "tokens_per_forward": self.tokens_per_forward, "wall_seconds": self.wall_seconds,
                "tokens_per_second": self.new_tokens * self.tokens.shape[0] / max(self.wall_seconds, 1e-9),
                "head_acceptance": self.acceptance}


def _pick(logits, temperature, top_k, generator):
    """logits [B, V] -> token ids [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate(model, input_ids, max_new_tokens: int, *, speculative: bool = False,
             stop_token: Optional[int] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None
             ) -> GenerateOutput:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, P] with P >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if speculative and temperature > 0:
        raise ValueError("speculative decoding is greedy: use temperature=0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = model.cfg.n_future
    B, P = input_ids.shape
    extra = n if speculative else 1
    if P + max_new_tokens + extra > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) + {extra} exceeds "
                         f"max_seq_len {model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    caches = model.new_caches(B)
    # plain decoding needs the next-token head only; speculative decoding runs every head
    heads = n if speculative else 1
    logits = model.forward_cached(input_ids, caches, heads)[:, :, -1]  # [heads, B, V], last position
    forwards = 1
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    made = 0
    proposed = torch.zeros(max(n - 1, 0), dtype=torch.long)
    accepted = torch.zeros(max(n - 1, 0), dtype=torch.long)
    steps = torch.arange(n - 1)

    def emit(tok):  # tok [B, m]; finished sequences repeat their stop token
        nonlocal done
        if stop_token is not None:
            tok = tok.clone()
            for j in range(tok.shape[1]):
                tok[done, j] = stop_token
                done = done | (tok[:, j] == stop_token)
        out.append(tok)

    while made < max_new_tokens and not bool(done.all()):
        nxt = _pick(logits[0], temperature, top_k, generator)  # the verified next token
        if not speculative or n == 1 or made + 1 == max_new_tokens:
            emit(nxt[:, None])
            made += 1
            if made < max_new_tokens and not bool(done.all()):
                logits = model.forward_cached(nxt[:, None], caches, heads)[:, :, -1]
                forwards += 1
            continue
        drafts = logits[1:].argmax(-1).t()                   # [B, n-1]
        block = torch.cat([nxt[:, None], drafts], dim=1)     # [B, n]
        start = caches[0].length
        block_logits = model.forward_cached(block, caches)   # [n, B, n, V]
        forwards += 1
        verify = block_logits[0].argmax(-1)                  # head 0 after each block token
        # drafts[:, i] is right when it equals head 0's choice after block[:, i]
        ok = (drafts == verify[:, :-1])
        run = ok.long().cumprod(dim=1).sum(dim=1)            # accepted drafts per sequence
        active = ~done
        m_acc = int(run[active].min()) if bool(active.any()) else 0
        m = min(1 + m_acc, max_new_tokens - made)           # tokens taken from the block
        # head k+1's draft was checked where the drafts before it were all accepted
        checked = active[:, None] & (run[:, None] >= steps)                # [B, n-1]
        proposed += checked.sum(0)
        accepted += (checked & ok).sum(0)
        emit(block[:, :m])
        made += m
        for c in caches:
            c.truncate(start + m)
        # the logits after the last kept token: head 0 verified, heads 1.. draft the next ones
        logits = block_logits[:, :, m - 1]
    wall = time.perf_counter() - t0
    model.train(was_training)
    return GenerateOutput(torch.cat(out, dim=1), made, forwards, wall, proposed.tolist(),
                          accepted.tolist())
