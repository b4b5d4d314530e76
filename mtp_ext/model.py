"""The reference multi-token prediction transformer of Gloeckle et al. 2024: a shared trunk, n
heads that are each one transformer layer, a shared final norm and one shared unembedding (tied
to the embedding, or one per head). Head 0 is the ordinary next-token head; head k predicts the
token k + 1 positions ahead. With head_style "sequential" heads 1..n-1 are DeepSeek-V3's MTP
modules instead (MTPModule): depth k takes depth k-1's hidden state and the embedding of the
token k positions ahead."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .outputs import MTPLossOutput
from .decoding.packed_linear import Linear, linear, packed_linears

LOSS_IMPLS = ("fused", "reference")
HEAD_STYLES = ("parallel", "sequential")


@dataclass
class MTPConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4          # trunk layers
    n_heads: int = 4           # attention heads
    n_future: int = 4          # prediction heads (n)
    d_ff: Optional[int] = None  # SwiGLU hidden size; default about 8/3 d_model, a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    per_head_unembedding: bool = False
    z_loss: float = 0.0
    chunk_size: Optional[int] = None
    # "parallel": Gloeckle et al.'s heads, each one layer on the trunk's output; "sequential":
    # DeepSeek-V3's MTP modules (MTPModule), depth k on depth k-1's output
    head_style: str = "parallel"
    # the loss's weight per head (None: all 1, the sum of the n losses); DeepSeek-V3 trains its
    # D = n - 1 modules with [1] + [lambda / D] * D, lambda 0.3 then 0.1
    head_weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_future", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "n_layers" else 1):
                raise ValueError(f"MTPConfig.{name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"MTPConfig: d_model ({self.d_model}) must split into n_heads "
                             f"({self.n_heads}) heads of even size")
        if self.tie_embeddings and self.per_head_unembedding:
            raise ValueError("MTPConfig: tie_embeddings and per_head_unembedding exclude each other")
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.head_style not in HEAD_STYLES:
            raise ValueError(f"MTPConfig.head_style must be one of {HEAD_STYLES}, got "
                             f"{self.head_style!r}")
        if self.head_style == "sequential" and self.per_head_unembedding:
            raise ValueError("MTPConfig: sequential MTP modules share one output head "
                             "(per_head_unembedding must be False)")
        if self.head_weights is not None:
            w = tuple(float(v) for v in self.head_weights)
            if len(w) != self.n_future or any(not math.isfinite(v) or v < 0 for v in w):
                raise ValueError(f"MTPConfig.head_weights must be {self.n_future} finite "
                                 f"non-negative numbers (one per head), got {self.head_weights!r}")
            self.head_weights = w

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"MTPConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):
    """x [B, H, T, hd]; cos, sin [T, hd / 2] (rotating pairs of halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: Optional["KVCache"] = None, mask=None, pos=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # T new positions after the cached ones: each sees the cache, itself and before
            k, v = cache.append(k, v) if pos is None else cache.write(k, v, pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class KVCache:
    """Keys and values of one attention layer for positions [0, length), in buffers sized for
    max_len positions. append() writes the new positions and returns the keys and values so far;
    truncate() forgets positions past a length (rejected drafts). write() writes at positions
    given per sequence (each sequence of a batch at its own length; the attention mask hides
    what lies past a sequence's position); select() keeps some sequences of the batch."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, max_len: int, dtype, device,
                 groups: int = 1):
        # groups: layers stacked along the batch (the draft heads): [groups * batch, ...]
        self.groups = groups
        # zeros, not empty: attention reads slots past a sequence's length under a mask, and
        # a masked slot must hold finite values (0 x nan is nan)
        self.k = torch.zeros(groups * batch, n_heads, max_len, head_dim, dtype=dtype,
                             device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of {self.k.shape[2]} positions cannot hold {end}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, length: int):
        self.length = min(self.length, length)

    def write(self, k, v, pos):
        """k, v [B, H, T, hd] at positions pos [B, T]; returns the keys and values of
        positions [0, max(pos)] of every sequence."""
        end = int(pos.max()) + 1
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of {self.k.shape[2]} positions cannot hold {end}")
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[b, :, pos] = k.transpose(1, 2)
        self.v[b, :, pos] = v.transpose(1, 2)
        self.length = max(self.length, end)
        return self.k[:, :, :end], self.v[:, :, :end]

    def move(self, src, dst):
        """Copies the keys and values at slots src [B, m] of each sequence to slots dst [B, m]."""
        b = torch.arange(src.shape[0], device=src.device)[:, None]
        self.k[b, :, dst] = self.k[b, :, src]
        self.v[b, :, dst] = self.v[b, :, src]

    def select(self, rows):
        """Keeps the sequences rows (indices into the batch), in that order."""
        pick = lambda t: t.view(self.groups, -1, *t.shape[1:])[:, rows].flatten(0, 1)
        self.k, self.v = pick(self.k), pick(self.v)


class DraftBuffer:
    """What sequential MTP modules read when they draft (MTPTransformer.sequential_draft), per
    sequence and position: the tokens (decided ones, then the current drafts) and head 0's
    layer output. Kept with the KV caches (select() keeps some sequences)."""

    def __init__(self, batch: int, max_len: int, n_future: int, d_model: int, dtype, device):
        self.tokens = torch.zeros(batch, max_len + 2 * n_future, dtype=torch.long, device=device)
        self.h0 = torch.zeros(batch, max_len, d_model, dtype=dtype, device=device)

    def truncate(self, length: int):
        pass  # written at given positions: nothing past a length is read

    def select(self, rows):
        self.tokens, self.h0 = self.tokens[rows], self.h0[rows]


class SwiGLU(nn.Module):
    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.gate_up = Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, mask=None, pos=None):
        x = x + self.attn(self.norm1(x), cos, sin, cache, mask, pos)
        return x + self.mlp(self.norm2(x))


class MTPModule(nn.Module):
    """DeepSeek-V3's MTP module (technical report, sec. 2.2): at depth k, position i combines
    depth k-1's hidden state h_i (the main model's last layer for k = 1) with the embedding of
    token i + k: h'_i = Block(eh_proj([enorm(e_{i+k}); hnorm(h_i)])), then the shared final
    norm and output head predict token i + k + 1. Names and order as in transformers'
    DeepSeek-V3 MTP layers (enorm, hnorm, eh_proj: embedding first)."""

    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)

    def forward(self, h, e, cos, sin, cache=None, mask=None, pos=None):
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, cache, mask, pos)


class MTPOutput(NamedTuple):
    loss: Optional[MTPLossOutput]  # with labels: loss, head_losses, head_accuracy, head_tokens
    logits: Optional[torch.Tensor]  # [n, B, V]: each head's logits at the last position


class MTPTransformer(nn.Module):
    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.trunk = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.heads = nn.ModuleList([Block(cfg)] + [
            MTPModule(cfg) if cfg.head_style == "sequential" else Block(cfg)
            for _ in range(cfg.n_future - 1)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.per_head_unembedding:
            self.unembed = nn.Parameter(torch.empty(cfg.n_future, cfg.vocab_size, cfg.d_model))
        elif not cfg.tie_embeddings:
            self.unembed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.cfg.d_model ** -0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
        for blk in self.blocks():  # residual branches start small
            nn.init.normal_(blk.attn.out.weight, std=std / math.sqrt(2 * (len(self.trunk) + 1)))
            nn.init.normal_(blk.mlp.down.weight, std=std / math.sqrt(2 * (len(self.trunk) + 1)))
        nn.init.normal_(self.embed.weight, std=1.0)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.unembed, std=std)

    @property
    def sequential(self) -> bool:
        return self.cfg.head_style == "sequential"

    def blocks(self):
        """Every transformer Block: the trunk's, then each head's (an MTPModule's inner one)."""
        for m in list(self.trunk) + list(self.heads):
            yield m.block if isinstance(m, MTPModule) else m

    @property
    def unembedding(self) -> torch.Tensor:
        """[V, D] shared, or [n, V, D] per head."""
        return self.embed.weight if self.cfg.tie_embeddings else self.unembed

    def trunk_forward(self, input_ids):
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(input_ids)
        for blk in self.trunk:
            x = blk(x, cos, sin)
        return x, cos, sin

    def head_forward(self, k, x, cos, sin):
        """Head k's final hidden state (after the shared norm) from the trunk's output x
        (parallel heads, and head 0 of either style)."""
        if k and self.sequential:
            raise ValueError("head_forward: a sequential MTP module needs the previous depth "
                             "and the tokens ahead (sequential_forward)")
        return self.norm(self.heads[k](x, cos, sin))

    def sequential_forward(self, input_ids, h, cos, sin):
        """The MTP modules 1..n-1 on head 0's layer output h [B, T, D] (before the final norm):
        depth k at positions 0..T-1-k (token i + k exists there), padded with zeros to T (the
        loss has no label there). Returns their final hidden states (after the shared norm),
        each [B, T, D]."""
        B, T, D = h.shape
        out = []
        for k in range(1, self.cfg.n_future):
            if T - k <= 0:
                out.append(h.new_zeros(B, T, D))
                continue
            h = self.heads[k](h[:, :T - k], self.embed(input_ids[:, k:]), cos[:T - k], sin[:T - k])
            out.append(F.pad(self.norm(h), (0, 0, 0, k)))
        return out

    def _sequential_last_logits(self, input_ids, h, cos, sin, first_logits):
        """Each depth's logits at the last position, module k reading the greedy drafts of
        depths 0..k-1 as the tokens past the input: [n - 1, B, V]."""
        T, out, ids = input_ids.shape[1], [], input_ids
        logits = first_logits
        for k in range(1, self.cfg.n_future):
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            h = self.heads[k](h, self.embed(ids[:, k:k + T]), cos, sin)
            logits = self.head_logits(k, self.norm(h[:, -1]))
            out.append(logits)
        return out

    def head_logits(self, k, h):
        w = self.unembedding
        return linear(h, w[k] if w.dim() == 3 else w)

    base_frozen = False  # freeze_base(): heads 1..n-1 train on a fixed next-token model

    def base_parameters(self, unembedding: bool = True):
        """What predicts the next token: embedding, trunk, head 0, final norm and (with
        `unembedding`) the shared unembedding."""
        yield from self.embed.parameters()
        yield from self.trunk.parameters()
        yield from self.heads[0].parameters()
        yield from self.norm.parameters()
        if unembedding and not self.cfg.tie_embeddings:
            yield self.unembed

    def freeze_base(self, frozen: bool = True, *, train_unembedding: bool = False):
        """Heads-only training (Medusa-1's recipe; MTP heads added to a trained model): the
        base (base_parameters) gets no gradient and runs under no_grad in the forward, so it
        keeps no activations for backward; heads 1..n-1 train on the base's trunk output,
        through the frozen final norm and the shared unembedding (frozen too, unless
        train_unembedding: a separate one then trains, which changes head 0's logits as well).
        Give the optimizer `[p for p in model.parameters() if p.requires_grad]`."""
        if self.cfg.per_head_unembedding:
            raise ValueError("freeze_base: a per-head unembedding is one parameter for every "
                             "head, head 0's included; freeze it or train it whole")
        if train_unembedding and self.cfg.tie_embeddings:
            raise ValueError("freeze_base(train_unembedding=True): the unembedding is the "
                             "embedding (tie_embeddings), which the base needs frozen")
        self.base_frozen = frozen
        for p in self.base_parameters(unembedding=not train_unembedding):
            p.requires_grad_(not frozen)
        return self

    def forward(self, input_ids, labels=None, *, loss_impl="fused", return_logits=None):
        """input_ids [B, T]. With labels ([B, T], usually input_ids): the MTP loss, head k at
        position t predicting labels[:, t + k + 1] (sequential modules: depth k at position t
        reads token t + k, and the positions past T - 1 - k have no label). return_logits
        (default: when no labels): each head's logits at the last position only, [n, B, V]
        (sequential: depth k reading the greedy drafts of depths 0..k-1)."""
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        with torch.no_grad() if self.base_frozen else contextlib.nullcontext():
            x, cos, sin = self.trunk_forward(input_ids)
            h0_layer = self.heads[0](x, cos, sin)
            h0 = self.norm(h0_layer)
        want_logits = return_logits or (return_logits is None and labels is None)
        if not self.sequential:
            hs = [h0] + [self.head_forward(k, x, cos, sin) for k in range(1, self.cfg.n_future)]
        elif labels is not None:
            hs = [h0] + self.sequential_forward(input_ids, h0_layer, cos, sin)
        loss = None
        if labels is not None:
            from . import loss as fused, reference
            fn = fused.mtp_loss if loss_impl == "fused" else reference.mtp_loss
            loss = fn(torch.stack(hs), self.unembedding, labels, z_loss=self.cfg.z_loss,
                      chunk_size=self.cfg.chunk_size, head_weights=self.cfg.head_weights)
        logits = None
        if want_logits and self.sequential:
            first = self.head_logits(0, h0[:, -1])
            logits = torch.stack([first] + self._sequential_last_logits(
                input_ids, h0_layer, cos, sin, first))
        elif want_logits:
            logits = torch.stack([self.head_logits(k, h[:, -1]) for k, h in enumerate(hs)])
        return MTPOutput(loss, logits)

    # ---- incremental decoding ----

    def new_caches(self, batch: int, max_len: Optional[int] = None):
        """One KVCache per trunk layer and for head 0, and one for the draft heads 1..n-1
        together (their layers run as one stacked computation in cached decoding)."""
        c = self.cfg
        max_len = max_len or c.max_seq_len
        p = self.embed.weight
        new = lambda groups, dt: KVCache(batch, c.n_heads, c.d_model // c.n_heads, max_len, dt,
                                         p.device, groups)
        if self.sequential:  # one cache per MTP module, and what the modules read
            return ([new(1, p.dtype) for _ in range(c.n_layers + c.n_future)]
                    + [DraftBuffer(batch, max_len, c.n_future, c.d_model, p.dtype, p.device)])
        return ([new(1, p.dtype) for _ in range(c.n_layers + 1)]
                + ([new(c.n_future - 1, self._draft_dtype())] if c.n_future > 1 else []))

    per_row_positions = True  # forward_cached takes positions per sequence (mtp_ext.decoding.generate)

    def forward_cached(self, input_ids, caches, heads: Optional[int] = None, positions=None):
        """Runs the T new tokens input_ids [B, T] after the positions the caches hold (adding
        them to the caches); returns the logits of heads 0..heads-1 (default: all n) at the new
        positions, [heads, B, T, V]. With heads = 1 the draft heads' cache is not updated.
        positions [B]: sequence b's tokens go after its first positions[b] cached ones (what the
        caches hold past them is overwritten or masked)."""
        if positions is not None and input_ids.shape[0] == 1:  # one sequence: cut back
            for c in caches:
                c.truncate(int(positions[0]))
            positions = None
        heads = self.cfg.n_future if heads is None else heads
        with packed_linears():
            if positions is not None:
                T = input_ids.shape[1]
                geo = self._geometry(positions, torch.arange(T, device=input_ids.device))
                return self._layers_cached(input_ids, caches, heads, *geo)
            start, T = caches[0].length, input_ids.shape[1]
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len "
                                 f"{self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            # query i (position start + i) sees keys 0..start + i; one new token sees them all
            mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool,
                                                   device=input_ids.device).tril(start)
            return self._layers_cached(input_ids, caches, heads, cos, sin, mask)

    def forward_tree(self, tokens, caches, positions, depth, visible):
        """The trunk and head 0 on a tree of candidate tokens after each sequence's cached
        positions (greedy tree drafting, mtp_ext.decoding.generate): tokens [B, T], node 0 the root;
        depth [T] of each node (its RoPE position is positions + depth); visible [T, T] bool,
        node i sees node j (j is i or an ancestor of i). Node j's keys and values go to slot
        positions + j of the trunk's and head 0's caches (commit_path moves a kept path into
        place). Returns head 0's logits [B, T, V] and the trunk's output [B, T, D]."""
        L = self.cfg.n_layers
        with packed_linears():
            cos, sin, mask, slots = self._geometry(positions, depth, visible)
            x = self._trunk_cached(tokens, caches, cos, sin, mask, slots)
            h = self.norm(self.heads[0](x, cos, sin, caches[L], mask, slots))
            return self.head_logits(0, h), x

    def commit_path(self, caches, positions, path):
        """path [B, m]: the tree nodes kept by each sequence, root first; moves their keys and
        values in the trunk's and head 0's caches to slots positions .. positions + m - 1."""
        ar = torch.arange(path.shape[1], device=path.device)
        for c in caches[:self.cfg.n_layers + 1]:
            c.move(positions[:, None] + path, positions[:, None] + ar)

    def draft_forward(self, x, caches, positions):
        """The draft heads 1..n-1 on the trunk's outputs x [B, m, D] of each sequence's next m
        positions after positions [B] (a kept path); returns their logits [n-1, B, m, V]."""
        with packed_linears():
            cos, sin, mask, slots = self._geometry(positions,
                                                   torch.arange(x.shape[1], device=x.device))
            h = self.norm(self._draft_layers(x, cos, sin, caches[self.cfg.n_layers + 1], mask,
                                             slots))
            return self._heads_logits(h, first=1)

    def sequential_verify(self, ids, caches, positions):
        """Sequential MTP modules' decoding (mtp_ext.decoding.generate): the trunk and head 0 on
        ids [A, T] at slots positions + j of each sequence [A]; the tokens and head 0's layer
        outputs go to the DraftBuffer. Returns head 0's logits [A, T, V]."""
        L, buf = self.cfg.n_layers, caches[-1]
        with packed_linears():
            cos, sin, mask, slots = self._geometry(positions,
                                                   torch.arange(ids.shape[1], device=ids.device))
            x = self._trunk_cached(ids, caches, cos, sin, mask, slots)
            h = self.heads[0](x, cos, sin, caches[L], mask, slots)
            rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
            buf.tokens[rows, slots] = ids
            buf.h0[rows, slots] = h
            return self.head_logits(0, self.norm(h))

    def sequential_draft(self, caches, last, nxt, span: int, pick):
        """The MTP modules' chain of drafts after each sequence's newest decided token nxt [A]
        (at slot last + 1; last [A] is the position of the token before it, the newest whose
        head-0 output exists). Module k runs on the `span` positions ending at last (fewer
        when a sequence is shorter: from 0), rewriting the cache entries there, since those
        of the last steps read drafts; position i reads token i + k from the buffer, at last
        the draft of module k-1. pick(logits [A, V]) -> tokens [A] (greedy or drawn).
        Returns the drafts [A, n-1] and their logits [n-1, A, V]."""
        L, n, buf = self.cfg.n_layers, self.cfg.n_future, caches[-1]
        rows = torch.arange(last.shape[0], device=last.device)
        start = (last - span + 1).clamp(min=0)
        at = last - start                                   # last's index in the span
        buf.tokens[rows, last + 1] = nxt
        drafts, logits = [], []
        with packed_linears():
            cos, sin, mask, slots = self._geometry(start, torch.arange(span, device=last.device))
            h = buf.h0[rows[:, None], slots]
            for k in range(1, n):
                e = self.embed(buf.tokens[rows[:, None], slots + k])
                h = self.heads[k](h, e, cos, sin, caches[L + k], mask, slots)
                out = self.head_logits(k, self.norm(h[rows, at]))
                drafts.append(pick(out))
                logits.append(out)
                buf.tokens[rows, last + 1 + k] = drafts[-1]
        return torch.stack(drafts, 1), torch.stack(logits)

    def _geometry(self, positions, depth, visible=None):
        """RoPE tables, attention mask and cache slots of T new tokens per sequence after
        positions [B]: token i at RoPE position positions + depth[i] and slot positions + i,
        seeing the cached positions and the new tokens j with visible[i, j] (default: j <= i)."""
        T, dev = depth.shape[0], depth.device
        slots = positions[:, None] + torch.arange(T, device=dev)               # [B, T]
        rope = positions[:, None] + depth                                       # [B, T]
        end = int(slots.max()) + 1
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[rope][:, None], self.rope_sin[rope][:, None]   # [B, 1, T, hd/2]
        rel = torch.arange(end, device=dev)[None, :] - positions[:, None]      # [B, end]
        if visible is None:
            mask = rel[:, None, :] <= torch.arange(T, device=dev)[None, :, None]
        else:
            new = visible[:, rel.clamp(0, T - 1)].permute(1, 0, 2) & (rel < T)[:, None, :]
            mask = (rel < 0)[:, None, :] | new
        return cos, sin, mask[:, None], slots                        # mask [B, 1, T, end]

    def _trunk_cached(self, input_ids, caches, cos, sin, mask, pos):
        x = self.embed(input_ids)
        for i, blk in enumerate(self.trunk):
            x = blk(x, cos, sin, caches[i], mask, pos)
        return x

    def _layers_cached(self, input_ids, caches, heads, cos, sin, mask, pos=None):
        """The trunk, then heads 0..heads-1, on cached decoding's new tokens: head 0's layer,
        and the draft heads' layers as one stacked computation."""
        L = self.cfg.n_layers
        x = self._trunk_cached(input_ids, caches, cos, sin, mask, pos)
        hs = [self.norm(self.heads[0](x, cos, sin, caches[L], mask, pos))]
        if heads > 1:
            hs.extend(self.norm(self._draft_layers(x, cos, sin, caches[L + 1], mask, pos))[:heads - 1])
        return self._heads_logits(torch.stack(hs))

    def _heads_logits(self, h, first: int = 0):
        """Logits [k, ..., V] of heads first..first+k-1 from their hidden states h [k, ..., D]:
        with a shared unembedding one product (the weight read once, not once per head)."""
        w = self.unembedding
        if w.dim() == 2:
            return linear(h, w)
        return torch.stack([self.head_logits(first + i, hi) for i, hi in enumerate(h)])

    draft_dtype: Optional[torch.dtype] = None  # of the draft heads in cached decoding
    draft_tree = None  # rank paths of greedy tree drafting (mtp_ext.decoding.generate); None: the chain
    draft_stats = None  # {rank path: share}: the cost model's acceptance (mtp_ext.decoding.cost_model)

    def _draft_dtype(self) -> torch.dtype:
        """The draft heads' dtype in cached decoding: draft_dtype when set; by default bf16 for
        an fp32 model on a CPU with bf16 instructions (a draft only proposes: head 0 verifies
        it at the model's precision, so outputs do not change; a stacked bf16 product of 4 rows
        takes about half the time of fp32's there), else the model's dtype."""
        dt = self.embed.weight.dtype
        if self.draft_dtype is not None:
            return self.draft_dtype
        if (dt == torch.float32 and self.embed.weight.device.type == "cpu"
                and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return torch.bfloat16
        return dt

    def _draft_weights(self):
        """The weights of head layers 1..n-1 stacked per kind in the drafts' dtype, [n-1, ...]:
        built again when a parameter changes (its version, storage or dtype)."""
        blocks = self.heads[1:]
        names = ("norm1.weight", "attn.qkv.weight", "attn.out.weight", "norm2.weight",
                 "mlp.gate_up.weight", "mlp.down.weight")
        params = [[b.get_parameter(n) for b in blocks] for n in names]
        dt = self._draft_dtype()
        key = (dt,) + tuple((p.data_ptr(), p._version, p.dtype) for ps in params for p in ps)
        cached = self.__dict__.get("_draft_stack")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, [torch.stack([p.detach() for p in ps]).to(dt) for ps in params])
            self.__dict__["_draft_stack"] = cached
        return cached[1]

    def _draft_layers(self, x, cos, sin, cache, mask, pos):
        """Head layers 1..n-1 (Block) on the trunk's output x [B, T, D] in one stacked pass,
        their KV caches stacked along the batch: [n-1, B, T, D]. A second form of Block
        (RMSNorm, attention, SwiGLU), kept for speed (one product per kind for every draft
        head); tests/test_generate.py ties it to the blocks (float64, 1e-10)."""
        n1n, wqkv, wout, n2n, wgu, wdown = self._draft_weights()
        k, (B, T, D), H = wqkv.shape[0], x.shape, self.cfg.n_heads
        eps = self.cfg.norm_eps
        xs = x.to(wqkv.dtype).reshape(1, B * T, D).expand(k, B * T, D)
        a = F.rms_norm(xs, (D,), None, eps) * n1n[:, None]
        q, kk, v = torch.bmm(a, wqkv.transpose(1, 2)).view(k * B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        if cos.dim() == 4:  # per-sequence positions: [B, 1, T, hd / 2], mask [B, 1, T, K]
            cos, sin = cos.repeat(k, 1, 1, 1), sin.repeat(k, 1, 1, 1)
            mask = mask.repeat(k, 1, 1, 1)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        kk, v = cache.append(kk, v) if pos is None else cache.write(kk, v, pos.repeat(k, 1))
        y = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)
        xs = xs + torch.bmm(y.transpose(1, 2).reshape(k, B * T, D), wout.transpose(1, 2))
        g, u = torch.bmm(F.rms_norm(xs, (D,), None, eps) * n2n[:, None],
                         wgu.transpose(1, 2)).chunk(2, dim=-1)
        xs = xs + torch.bmm(F.silu(g) * u, wdown.transpose(1, 2))
        return xs.view(k, B, T, D).to(x.dtype)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, speculative: bool = False,
                 stop_token: Optional[int] = None, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 prompt_lengths=None, tree=None, plan=None):
        """Plain or self-speculative decoding, greedy or sampled (temperature / top_k), greedy
        with a tree of drafts or planned by the cost model; see mtp_ext.decoding.generate."""
        from .decoding.generate import generate
        return generate(self, input_ids, max_new_tokens, speculative=speculative,
                        stop_token=stop_token, temperature=temperature, top_k=top_k,
                        generator=generator, prompt_lengths=prompt_lengths, tree=tree, plan=plan)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
