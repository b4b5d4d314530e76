"""A Hugging Face model's own MTP layers, trained with the fused loss.

    model = AutoModelForCausalLM.from_pretrained(path)        # config.num_mtp_layers > 0
    mtp = mtp_ext.hf.NativeMTPForCausalLM.from_pretrained(path)   # the checkpoint's MTP layers
    # or NativeMTPForCausalLM.from_causal_lm(model): new layers (transformers' own init)
    out = mtp(input_ids, attention_mask=mask, labels=labels)  # out.loss: main + lambda / D sum
    out.loss.backward()
    mtp.save_pretrained(out_dir)   # AutoModelForCausalLM.from_pretrained(out_dir)
                                   #   .generate(ids, use_mtp=True) drafts with the trained layers

The MTP layers are transformers' own `MtpModel` (transformers.modeling_layers; DeepSeek-V3,
GLM-4.5, Mellum, ...: the families whose config has `num_mtp_layers`), the module that
`generate(use_mtp=True)` loads from the checkpoint and drafts with. transformers does not train
them: `MtpModel.forward(labels=...)` would project every depth to full logits. Here depth k
(0-based) reads, at position t, the previous depth's output at t (depth 0: the hidden state that
transformers' drafting passes, `hidden_states[-1]` of the main model) and the embedding of token
t + k + 1, at that token's position, and learns token t + k + 2 through the shared output head;
all depths and the main head go to one `mtp_loss` call, so no [tokens x vocab] logits exist.
Loss: DeepSeek-V3's, L_main + lambda / D * sum_k L_k (lambda = `mtp_weight`, 0.3 by default;
D the number of MTP layers), each term the mean over its labelled tokens, or its sum /
`num_items_in_batch` (what Trainer passes under gradient accumulation).

save_pretrained writes the base model's checkpoint with the MTP layers under the names the
family's checkpoints use (`model.layers.{num_hidden_layers + k}.*` for DeepSeek-V3 and GLM-4.5,
`mtp.layers.{k}.*` for Mellum): the keys that transformers' `MtpModel.from_pretrained` selects with
the model's `_keys_to_ignore_on_load_unexpected` patterns. A DeepSeek-V3 model is found there only
with 61 layers (its pattern is `model\\.layers\\.61.*`): save_pretrained refuses a key that the
pattern does not select, naming both.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch
from torch import nn

from .mtp_model import heads_output

# The MTP layer's own modules: checkpoints keep them beside the block's weights, one level up.
_OWN = ("enorm", "hnorm", "eh_proj", "post_norm")


def _mtp_model_class():
    try:
        from transformers.modeling_layers import MtpModel
    except ImportError as e:  # pragma: no cover - older transformers
        raise ImportError("mtp_ext.hf.NativeMTPForCausalLM needs transformers' MtpModel "
                          "(transformers >= 5.x with num_mtp_layers)") from e
    return MtpModel


def _num_mtp_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_mtp_layers", None)
    if not n:
        raise ValueError(f"mtp_ext.hf: {type(model).__name__} (model_type "
                         f"{getattr(config, 'model_type', None)!r}) has no MTP layers "
                         f"(config.num_mtp_layers is {n!r}); for MTP heads on any causal LM use "
                         f"mtp_ext.hf.MTPForCausalLM")
    if getattr(text, "output_router_logits", False):
        raise ValueError("mtp_ext.hf.NativeMTPForCausalLM: config.output_router_logits is True "
                         "(the router's auxiliary loss is not part of the fused loss); set it False")
    return int(n)


def _right_padded(mask: torch.Tensor) -> bool:
    """Whether each row of a [B, T] attention mask is ones then zeros."""
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _new_mtp_model(model: nn.Module, n: int) -> nn.Module:
    """New MTP layers for `model`, initialized as its family initializes its own layers.
    MtpModel's own initialization is the generic one, which leaves weights it does not know
    uninitialized (torch.empty): e.g. the MoE experts' stacked weights of DeepSeek-V3, GLM-4.5
    and Mellum (transformers 5.24; NaN or garbage, depending on what the allocator reuses)."""
    p = next(model.parameters())
    mtp = _mtp_model_class()(model, n)
    with torch.no_grad():
        for module in mtp.layers.modules():
            model._init_weights(module)
    bad = [name for name, t in mtp.layers.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"mtp_ext.hf: new MTP layers of {type(model).__name__} have "
                           f"non-finite weights after initialization: {bad}")
    return mtp.to(device=p.device, dtype=p.dtype)


class NativeMTPForCausalLM(nn.Module):
    """A causal LM with config.num_mtp_layers and its transformers `MtpModel`, trained with the
    fused loss (see the module's doc). model: the causal LM (used, not copied). mtp: its MtpModel
    (default: new layers). mtp_weight: lambda of the loss. chunk_size: as in mtp_ext.mtp_loss."""

    def __init__(self, model: nn.Module, mtp: Optional[nn.Module] = None, *,
                 mtp_weight: float = 0.3, chunk_size: Optional[int] = None,
                 freeze_base: bool = False):
        super().__init__()
        n = _num_mtp_layers(model)
        if not isinstance(mtp_weight, (int, float)) or not mtp_weight >= 0:
            raise ValueError(f"mtp_weight must be a number >= 0, got {mtp_weight!r}")
        if mtp is None:
            mtp = _new_mtp_model(model, n)
        if len(mtp.layers) != n:
            raise ValueError(f"mtp has {len(mtp.layers)} layers, config.num_mtp_layers is {n}")
        self.model = model
        self.mtp = mtp
        self.num_mtp_layers = n
        self.mtp_weight = float(mtp_weight)
        self.chunk_size = chunk_size
        self.base_frozen = False
        if freeze_base:
            self.freeze_base()

    @classmethod
    def from_causal_lm(cls, model: nn.Module, **kwargs) -> "NativeMTPForCausalLM":
        """New MTP layers on `model`, initialized as its family initializes its layers."""
        return cls(model, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, *, mtp_weight: float = 0.3,
                        chunk_size: Optional[int] = None, freeze_base: bool = False,
                        **kwargs) -> "NativeMTPForCausalLM":
        """The checkpoint's base model and MTP layers (transformers' MtpModel.from_pretrained, as
        generate(use_mtp=True) loads them); kwargs go to AutoModelForCausalLM.from_pretrained."""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        _num_mtp_layers(model)
        device = next(model.parameters()).device
        mtp = _mtp_model_class().from_pretrained(model, device_map={"": device})
        return cls(model, mtp, mtp_weight=mtp_weight, chunk_size=chunk_size,
                   freeze_base=freeze_base)

    @property
    def config(self):
        return self.model.config

    def freeze_base(self, frozen: bool = True) -> "NativeMTPForCausalLM":
        """MTP-layers-only training (FastMTP, Megatron-LM's frozen-base MTP): the base model, its
        embedding and output head included, gets no gradient and runs under no_grad; only the
        MTP layers' own parameters train (the MTP model shares the base's embedding and head)."""
        self.base_frozen = frozen
        for p in self.model.parameters():
            p.requires_grad_(not frozen)
        return self

    # -- training ------------------------------------------------------------------------------

    def depth_hidden_states(self, input_ids: torch.Tensor, attention_mask=None,
                            position_ids=None, **kwargs):
        """[main, depth 0, ..., depth D-1]: each [B, T, D] at the positions of input_ids, before
        the output head (depth k's last k + 1 positions zero: they read tokens past the end)."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("NativeMTPForCausalLM needs input_ids [B, T] (the MTP layers embed "
                             "the tokens ahead)")
        B, T = input_ids.shape
        if attention_mask is not None and not _right_padded(attention_mask):
            raise ValueError("NativeMTPForCausalLM: attention_mask has left padding; the MTP "
                             "layers train on right-padded batches (the usual collators' padding)")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.base_frozen):
            out = self.model.base_model(input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False,
                                        output_hidden_states=-1, return_dict=True, **kwargs)
        hidden = [out.last_hidden_state]
        prev = out.hidden_states[-1]  # what transformers' MTP drafting passes to depth 0
        for k in range(self.num_mtp_layers):
            length = T - 1 - k
            if length <= 0:
                hidden.append(torch.zeros_like(hidden[0]))
                continue
            prev = self.mtp.forward_layer(k, prev[:, :length], position_ids[:, k + 1:], None,
                                          input_ids=input_ids[:, k + 1:])
            hidden.append(nn.functional.pad(prev, (0, 0, 0, T - length)))
        return hidden

    def _head(self):
        """The output head as the MTP layers apply it: (weight, bias, scale of the hidden)."""
        head = self.mtp.shared_head
        weight, bias = head.weight, getattr(head, "bias", None)
        vocab = getattr(self.mtp.config, "unpadded_vocab_size", None)
        if vocab is not None and vocab < weight.shape[0]:
            weight = weight[:vocab]
            bias = None if bias is None else bias[:vocab]
        multiplier = getattr(self.mtp.config, "logits_mup_width_multiplier", None)
        return weight, bias, multiplier

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, **kwargs):
        """With labels: MTPCausalLMOutput with the loss (head 0 = the main model at position t
        learns labels[t + 1], MTP depth k learns labels[t + k + 2]; -100 ignored) and each term's
        loss, accuracy and token count. Without labels: the base model's own forward."""
        if labels is None:
            return self.model(input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, **kwargs)
        for name in ("logits_to_keep", "return_dict", "use_cache", "cache", "past_key_values",
                     "output_hidden_states"):
            kwargs.pop(name, None)
        hidden = self.depth_hidden_states(input_ids, attention_mask, position_ids, **kwargs)
        weight, bias, multiplier = self._head()
        if multiplier is not None:
            hidden = [h / multiplier for h in hidden]
        n = self.num_mtp_layers
        return heads_output(hidden, weight, labels, bias=bias,
                            head_weights=[1.0] + [self.mtp_weight / n] * n,
                            num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size)

    def gradient_checkpointing_enable(self, **kwargs):
        """The base model's gradient checkpointing (the MTP layers run without it)."""
        self.model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing_disable()

    # -- saving --------------------------------------------------------------------------------

    def checkpoint_keys(self) -> Dict[str, str]:
        """Each MTP weight's name in the MtpModel's state_dict -> its key in the family's
        checkpoint (the shared embedding and head left out: the base model's)."""
        regex = _mtp_model_class().get_mtp_weights_regex(self.model)
        layers = self.model.config.get_text_config().num_hidden_layers
        layouts = (lambda k: f"model.layers.{layers + k}.", lambda k: f"mtp.layers.{k}.",
                   lambda k: f"model.mtp.layers.{k}.")
        prefix = next((f for f in layouts if regex.search(f(0) + "enorm.weight")), None)
        if prefix is None:
            raise ValueError(f"mtp_ext.hf: no known checkpoint layout of MTP layers matches "
                             f"{type(self.model).__name__}'s pattern {regex.pattern!r}")
        deepseek_style = prefix is layouts[0]
        keys = {}
        for name in self.mtp.state_dict():  # parameters and persistent buffers
            m = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
            if m is None:
                if name.startswith(("embed_tokens.", "shared_head.")):
                    continue  # the base model's, saved with it
                if name.startswith("shared_post_norm.") and not deepseek_style:
                    key = prefix(0).replace("layers.0.", "") + "chain_norm." + name.split(".", 1)[1]
                else:
                    raise ValueError(f"mtp_ext.hf: no checkpoint name for MTP weight {name!r}")
            else:
                k, rest = int(m.group(1)), m.group(2)
                if rest.startswith("mtp_block."):
                    rest = rest[len("mtp_block."):]
                elif deepseek_style and rest.startswith("post_norm."):
                    rest = "shared_head.norm." + rest[len("post_norm."):]  # DeepSeek-V3's name
                key = prefix(k) + rest
            if not regex.search(key):
                raise ValueError(f"mtp_ext.hf: {type(self.model).__name__} finds MTP weights "
                                 f"with the pattern {regex.pattern!r} (its "
                                 f"_keys_to_ignore_on_load_unexpected), which does not select "
                                 f"{key!r} (a model of {layers} layers): transformers' "
                                 f"generate(use_mtp=True) could not load it")
            keys[name] = key
        return keys

    def save_pretrained(self, path: str, **kwargs) -> None:
        """The base model's save_pretrained with the MTP layers' weights added under the
        checkpoint names of checkpoint_keys() (transformers writes them in the checkpoint's own
        format, e.g. one tensor per expert)."""
        if "state_dict" in kwargs:
            raise ValueError("NativeMTPForCausalLM.save_pretrained writes its own state_dict")
        state = dict(self.model.state_dict())
        mtp_state = self.mtp.state_dict()
        for name, key in self.checkpoint_keys().items():
            state[key] = mtp_state[name]
        self.model.save_pretrained(path, state_dict=state, **kwargs)
