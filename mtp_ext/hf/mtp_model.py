"""Multi-token prediction heads on a pretrained Hugging Face causal LM.

    mtp = MTPForCausalLM.from_causal_lm(model, n_future=4)
    out = mtp(input_ids, attention_mask=mask, labels=labels)   # out.loss, out.head_losses
    mtp.generate(input_ids, max_new_tokens=64, do_sample=False)  # drafted by the heads

The base model's last decoder layer is head 0; heads 1..n-1 are copies of it (same class, same
initial weights) that read the same input (the trunk: the output of the layer before) and
predict tokens t+2..t+n; every head's output goes through the base model's final norm and its
output embedding, which all heads share. The loss is mtp_loss over the n heads' hidden states.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import ModelOutput

from ..decoding.generate import _stack, generate
from . import generation
from ..loss import mtp_loss
from .fused_loss import _supported, softcap_of

META_FILE = "mtp_ext.json"             # n_future and the loss options, beside config.json
HEADS_FILE = "mtp_heads.safetensors"   # heads 1..n-1 (head 0 is in the base model's weights)
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")  # across versions


@dataclass
class MTPCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None          # sum over heads of each head's loss
    logits: Optional[torch.FloatTensor] = None        # None: the logits are never materialized
    head_losses: Optional[torch.FloatTensor] = None   # [n] mean loss of each head (detached)
    head_accuracy: Optional[torch.FloatTensor] = None  # [n] top-1 accuracy of each head
    head_tokens: Optional[torch.LongTensor] = None    # [n] labelled positions of each head


def heads_output(hidden, weight, labels, *, bias=None, head_weights=None, softcap=None,
                 num_items_in_batch=None, chunk_size=None) -> MTPCausalLMOutput:
    """mtp_loss over the heads' hidden states (head k at t learns labels[t + k + 1]) as a causal
    LM's loss: each head's mean over its labelled tokens, or its sum / num_items_in_batch (what
    Trainer passes under gradient accumulation), weighted by head_weights and summed."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    out = mtp_loss(hidden, weight, labels.to(hidden[0].device), bias=bias,
                   head_weights=head_weights, softcap=softcap, reduction=reduction,
                   chunk_size=chunk_size)
    loss = out.loss
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return MTPCausalLMOutput(loss=loss, head_losses=out.head_losses,
                             head_accuracy=out.head_accuracy, head_tokens=out.head_tokens)


def _decoder_parts(model):
    """(decoder layers, final norm) of a supported causal LM."""
    base = model.base_model
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(base, "h", None)  # GPT-2
    norm = getattr(base, "norm", None)
    if norm is None:
        norm = getattr(base, "ln_f", None)  # GPT-2
    if layers is None or norm is None:
        raise ValueError(f"mtp_ext.hf: cannot find the decoder layers and final norm of "
                         f"{type(model).__name__}")
    return layers, norm


def _capture_call(layer, args, kwargs):
    """Forward pre-hook of the base model's last layer: while MTPForCausalLM runs the trunk,
    keep the layer's arguments (its input and the mask, positions, ... the model built)."""
    if layer.__dict__.get("_mtp_ext_capture"):
        layer._mtp_ext_call = (args, kwargs)


@functools.lru_cache(maxsize=None)
def _forward_args(layer_class) -> list:
    """The names of a layer class's forward arguments, self left out."""
    return list(inspect.signature(layer_class.forward).parameters)[1:]


def _with_cache(layer, args, kwargs, cache):
    """The captured call of the last layer, with `cache` in place of the base model's cache."""
    names = _forward_args(type(layer))
    args = tuple(cache if i < len(names) and names[i] in _CACHE_ARGS else a
                 for i, a in enumerate(args))
    kwargs = {k: (cache if k in _CACHE_ARGS else v) for k, v in kwargs.items()}
    return args, kwargs


class MTPForCausalLM(nn.Module):
    """n-head multi-token prediction on a Hugging Face causal LM (see the module's doc).

    model: the causal LM (its model_type in mtp_ext.hf.SUPPORTED); it is head 0 and is used,
    not copied. heads: the extra heads (default: n_future - 1 copies of its last layer).
    head_weights, chunk_size: as in mtp_ext.mtp_loss.
    """

    def __init__(self, model: nn.Module, n_future: int = 4, *,
                 head_weights: Optional[Sequence[float]] = None,
                 chunk_size: Optional[int] = None, freeze_base: bool = False):
        super().__init__()
        _supported(model)
        if not isinstance(n_future, int) or n_future < 1:
            raise ValueError(f"n_future must be an int >= 1, got {n_future!r}")
        if head_weights is not None and len(head_weights) != n_future:
            raise ValueError(f"head_weights has {len(head_weights)} entries, n_future is {n_future}")
        layers, _ = _decoder_parts(model)
        self.model = model
        self.n_future = n_future
        self.head_weights = None if head_weights is None else [float(w) for w in head_weights]
        self.chunk_size = chunk_size
        last = layers[-1]
        # copies made before the hook is added: the heads do not capture
        self.heads = nn.ModuleList(copy.deepcopy(last) for _ in range(n_future - 1))
        for head in self.heads:
            head.__dict__.pop("_mtp_ext_capture", None)
        if _capture_call not in last._forward_pre_hooks.values():
            last.register_forward_pre_hook(_capture_call, with_kwargs=True)
        self.base_frozen = False
        if freeze_base:
            self.freeze_base()

    def freeze_base(self, frozen: bool = True) -> "MTPForCausalLM":
        """Heads-only training (Medusa-1's recipe, FastMTP): the base model, its output
        embedding and final norm included, gets no gradient and runs under no_grad, so it keeps
        no activations for backward; heads 1..n-1 train on its trunk output. Trainer's optimizer
        takes only parameters that require gradients; in a plain loop pass
        `[p for p in mtp.parameters() if p.requires_grad]`."""
        if frozen and self.n_future < 2:
            raise ValueError("freeze_base: n_future is 1, there is no head to train")
        self.base_frozen = frozen
        for p in self.model.parameters():
            p.requires_grad_(not frozen)
        return self

    @classmethod
    def from_causal_lm(cls, model: nn.Module, n_future: int = 4, **kwargs) -> "MTPForCausalLM":
        """MTP heads on `model`: heads 1..n_future-1 start as copies of its last layer."""
        return cls(model, n_future, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.device

    # -- the heads' hidden states -------------------------------------------------------------

    def head_hidden_states(self, input_ids=None, *, head_caches=None, n_heads=None,
                           **kwargs) -> List[torch.Tensor]:
        """The final-normed hidden states of heads 0..n_heads-1 (default all), each [B, T, D]:
        head 0's is the base model's last hidden state. kwargs go to the base model's decoder
        (attention_mask, position_ids, inputs_embeds, cache, use_cache, ...); head_caches: one
        cache per extra head when decoding with a cache."""
        n_heads = self.n_future if n_heads is None else n_heads
        layers, norm = _decoder_parts(self.model)
        last = layers[-1]
        last._mtp_ext_capture = n_heads > 1
        try:
            with torch.no_grad() if self.base_frozen else contextlib.nullcontext():
                out = self.model.base_model(input_ids, return_dict=True, **kwargs)
        finally:
            last._mtp_ext_capture = False
            call = last.__dict__.pop("_mtp_ext_call", None)
        hidden = [out.last_hidden_state]
        if n_heads > 1:
            args, layer_kwargs = call
            for k, head in enumerate(self.heads[:n_heads - 1]):
                cache = None if head_caches is None else head_caches[k]
                a, kw = _with_cache(head, args, layer_kwargs, cache)
                h = head(*a, **kw)
                hidden.append(norm(h[0] if isinstance(h, tuple) else h))
        return hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output embedding (and the model's final softcap) on one head's hidden states."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = softcap_of(self.model)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- training ------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, num_items_in_batch=None, **kwargs):
        """With labels: MTPCausalLMOutput with the MTP loss (head k at position t learns
        labels[t + k + 1]; -100 is ignored); each head's mean over its labelled positions, or
        its sum / num_items_in_batch (what Trainer passes under gradient accumulation).
        Without labels: the base model's own forward (head 0's logits, exactly the base's)."""
        if labels is None:
            if kwargs.get("shift_labels") is not None:
                raise ValueError("MTPForCausalLM needs labels (token ids, shifted per head); "
                                 "shift_labels is not supported")
            return self.model(input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        for name in ("logits_to_keep", "return_dict", "use_cache", *_CACHE_ARGS):
            kwargs.pop(name, None)
        hidden = self.head_hidden_states(input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                                         use_cache=False, **kwargs)
        head = self.model.get_output_embeddings()
        return heads_output(hidden, head.weight, labels, bias=head.bias,
                            head_weights=self.head_weights, softcap=softcap_of(self.model),
                            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size)

    # activation (gradient) checkpointing: the base model's, on the extra heads too (Trainer
    # calls activation_checkpointing_enable; gradient_* are the older names)
    def _checkpointing(name):
        def method(self, **kwargs):
            getattr(self.model, name)(**kwargs)
            self._sync_checkpointing()
        method.__name__ = name
        method.__doc__ = f"The base model's {name}, carried to the extra heads."
        return method

    activation_checkpointing_enable = _checkpointing("activation_checkpointing_enable")
    activation_checkpointing_disable = _checkpointing("activation_checkpointing_disable")
    gradient_checkpointing_enable = _checkpointing("gradient_checkpointing_enable")
    gradient_checkpointing_disable = _checkpointing("gradient_checkpointing_disable")
    del _checkpointing

    def _sync_checkpointing(self):
        last = _decoder_parts(self.model)[0][-1]
        for head in self.heads:
            for name in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                if name in last.__dict__:
                    setattr(head, name, last.__dict__[name])

    # -- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor = None, generation_config=None, *,
                 attention_mask: Optional[torch.Tensor] = None, speculative: bool = True,
                 generator: Optional[torch.Generator] = None, **kwargs):
        """transformers' generate for MTP: `generate(ids, max_new_tokens=64, do_sample=False)`,
        decoded with the model's KV cache through mtp_ext.decoding.generate's loop. speculative=True
        drafts n-1 tokens with heads 1.. and keeps the longest prefix head 0 confirms, one
        forward per step: greedy, the same tokens as the base model's greedy decoding; sampled
        (do_sample, temperature, top_k, top_p), speculative sampling, the distribution of plain
        sampling. Takes a GenerationConfig (default the base model's) and the keyword arguments
        max_new_tokens, max_length, do_sample, temperature, top_k, top_p, eos_token_id (one or
        several), pad_token_id, return_dict_in_generate, and attention_mask for left-padded
        prompts; any other is a ValueError naming it. The second positional argument may be
        max_new_tokens. Returns the sequences [B, P + new] as transformers does (each input row
        as given, its tokens, pad_token_id after its end), or with return_dict_in_generate an
        mtp_ext GenerateOutput (`.sequences`, and tokens per forward, per-head acceptance).
        The sequences of a batch are decoded one after the other (the cache has one length)."""
        if isinstance(generation_config, int):  # generate(ids, 64)
            kwargs["max_new_tokens"], generation_config = generation_config, None
        if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError(f"MTPForCausalLM.generate: input_ids must be a [B, P] tensor, got "
                             f"{type(input_ids).__name__}")
        s = generation.resolve(getattr(self.model, "generation_config", None), generation_config,
                               kwargs, input_ids.shape[1])
        decoder = _Decoder(self)
        outs = [generate(decoder, p, s.max_new_tokens, speculative=speculative,
                         stop_token=s.eos or None, temperature=s.temperature, top_k=s.top_k,
                         top_p=s.top_p, generator=generator)
                for p in generation.prompts_of(input_ids, attention_mask)]
        seqs = generation.sequences(input_ids, outs, s.pad)
        if not s.return_dict:
            return seqs
        out = _stack(outs, s.eos or None)
        out.tokens, out.lengths = seqs, input_ids.shape[1] + out.sequence_tokens
        return out

    # -- saving --------------------------------------------------------------------------------

    def save_pretrained(self, path: str, **kwargs) -> None:
        """The base model's save_pretrained (config.json, weights; head 0 included), the extra
        heads in mtp_heads.safetensors and n_future and the loss options in mtp_ext.json."""
        from safetensors.torch import save_file
        self.model.save_pretrained(path, **kwargs)
        state = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, os.path.join(path, HEADS_FILE))
        meta = {"n_future": self.n_future, "head_weights": self.head_weights,
                "chunk_size": self.chunk_size}
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "MTPForCausalLM":
        """What save_pretrained wrote; kwargs go to AutoModelForCausalLM.from_pretrained."""
        from safetensors.torch import load_file
        meta_path = os.path.join(path, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path}: not an MTPForCausalLM directory (no {META_FILE})")
        try:  # JSON and safetensors: data by format; the base model by transformers' loader
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or "n_future" not in meta:
                raise ValueError("not an object with n_future")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: not a {META_FILE} written by save_pretrained "
                             f"({e})") from None
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        mtp = cls(model, meta["n_future"], head_weights=meta.get("head_weights"),
                  chunk_size=meta.get("chunk_size"))
        if mtp.n_future > 1:
            mtp.heads.load_state_dict(load_file(os.path.join(path, HEADS_FILE)))
        return mtp


class _Decoder:
    """MTPForCausalLM as mtp_ext.decoding.generate's loop sees a model: cfg, new_caches, forward_cached."""

    def __init__(self, mtp: MTPForCausalLM):
        self.mtp = mtp
        config = mtp.config
        self.cfg = SimpleNamespace(n_future=mtp.n_future,
                                   max_seq_len=getattr(config, "max_position_embeddings", 1 << 30))
        self._cache_arg = next(n for n in _CACHE_ARGS
                               if n in inspect.signature(mtp.model.base_model.forward).parameters)

    @property
    def training(self):
        return self.mtp.training

    def eval(self):
        self.mtp.eval()

    def train(self, mode: bool = True):
        self.mtp.train(mode)

    def new_caches(self, batch: int):
        caches = [DynamicCache(config=self.mtp.config) for _ in range(self.mtp.n_future)]
        for c in caches:  # sliding-window layers keep what a crop may need
            c.activate_past_recording()
        return [_Caches(caches, len(_decoder_parts(self.mtp.model)[0]) - 1)]

    def forward_cached(self, ids, caches, heads: Optional[int] = None):
        """Logits [heads, B, t, V] of ids [B, t] after the cached tokens; the caches grow by t."""
        c = caches[0].caches
        hidden = self.mtp.head_hidden_states(ids, head_caches=c[1:], n_heads=heads,
                                             use_cache=True, **{self._cache_arg: c[0]})
        return torch.stack([self.mtp.head_logits(h) for h in hidden])


class _Caches:
    """The base model's cache and one per extra head (which fills only the last layer's
    entry: the heads are copies of the last layer), cut back together."""

    def __init__(self, caches, last_layer: int):
        self.caches = caches
        self.last_layer = last_layer

    @property
    def length(self) -> int:
        return self.caches[0].get_seq_length(self.last_layer)

    def truncate(self, length: int) -> None:
        for c in self.caches:
            remove = c.get_seq_length(self.last_layer) - length
            # crop(-k) removes k; crop(0) trims a sliding-window layer back to its window. Only
            # filled layers: a head's cache has the last layer's entry only
            for layer in c.layers:
                if layer.is_initialized:
                    layer.crop(-remove)
