"""The fused loss for a Hugging Face causal LM.

    model = AutoModelForCausalLM.from_pretrained(...)
    mtp_ext.hf.use_fused_loss(model)       # model(input_ids, labels=labels).loss, no logits
    mtp_ext.hf.remove_fused_loss(model)    # back to the model's own forward

With labels, the patched forward runs the model's decoder (its `base_model`) and computes the
loss from the last hidden states and the output embedding with
`mtp_ext.linear_cross_entropy`: the [tokens, vocab] logits never exist, and `logits` is None in
the output (as Liger-Kernel does). The loss is the model's own (transformers'
`ForCausalLMLoss`): labels shifted left by one (or `shift_labels` as given), ignore_index -100,
mean over the labelled tokens, or sum / `num_items_in_batch` (what `Trainer` passes for gradient
accumulation); Gemma 2's `final_logit_softcapping` becomes the loss's softcap. Padding is
labelled -100 by the usual collators, as the model's own loss expects. Without labels the
forward is the model's own.
"""
from __future__ import annotations

import inspect
import types
from typing import Optional

import torch

from ..loss import linear_cross_entropy

# model_type -> the config attribute holding a final logit softcap (None: the family has none).
# Families whose causal LM computes logits = lm_head(last hidden state) [+ softcap] and the
# loss with ForCausalLMLoss, and nothing else (no logit scale, no auxiliary loss).
SUPPORTED = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma": None,
    "gemma2": "final_logit_softcapping",
    "gpt2": None,
}

_ORIGINAL = "_mtp_ext_original_forward"  # the instance's own forward attribute, if it had one


def _supported(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"mtp_ext.hf: {type(model).__name__} (model_type {model_type!r}) is not "
                         f"supported; supported model types: {', '.join(sorted(SUPPORTED))}")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"mtp_ext.hf: {type(model).__name__} has no output embedding "
                         f"(get_output_embeddings() is None): use its *ForCausalLM class")
    return model_type


def softcap_of(model: torch.nn.Module) -> Optional[float]:
    """The final logit softcap of a supported model's config, or None."""
    attr = SUPPORTED[_supported(model)]
    return getattr(model.config, attr, None) if attr else None


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor], *,
                   bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                   num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels), fused: hidden [B, T, D] (the last
    hidden states), weight [V, D] (the output embedding), labels [B, T] (token t's label is the
    token it reads; position t learns labels[t + 1]) or shift_labels [B, T] (already shifted)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: give labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                    softcap=softcap, chunk_size=chunk_size)
    loss = linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index,
                                softcap=softcap, reduction="sum", chunk_size=chunk_size)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _fused_forward(self, *args, **kwargs):
    original = getattr(self, _ORIGINAL)
    signature = inspect.signature(original)
    bound = signature.bind_partial(*args, **kwargs).arguments
    extra = {}
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            extra = bound.pop(name)
    arguments = {**bound, **extra}
    labels = arguments.pop("labels", None)
    shift_labels = arguments.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return original(*args, **kwargs)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    arguments.pop("logits_to_keep", None)  # every position has a label
    return_dict = arguments.pop("return_dict", None)
    outputs = self.base_model(**arguments, return_dict=True)
    head = self.get_output_embeddings()
    loss = causal_lm_loss(outputs[0], head.weight, labels, bias=head.bias,
                          softcap=softcap_of(self), num_items_in_batch=num_items_in_batch,
                          shift_labels=shift_labels, chunk_size=self._mtp_ext_chunk_size)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    rest = {k: v for k, v in rest.items() if k in CausalLMOutputWithPast.__dataclass_fields__}
    out = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    return out.to_tuple() if return_dict is False else out


def use_fused_loss(model: torch.nn.Module, *, chunk_size: Optional[int] = None) -> torch.nn.Module:
    """Makes this model instance compute its loss with the fused kernels (see the module's doc):
    `model(input_ids, labels=...)` then never materializes the logits. Returns the model.
    Raises ValueError for a model type outside SUPPORTED, naming it. chunk_size: rows per chunk
    of the loss (default: as many as fit 64 MiB)."""
    _supported(model)
    if _ORIGINAL not in model.__dict__:
        original = model.forward  # bound: the class's, or the instance's own
        setattr(model, _ORIGINAL, original)
        # a copy of _fused_forward that shows the model's own signature: Trainer keeps only the
        # batch columns that forward names; bound with MethodType, so deepcopy rebinds it
        fn = types.FunctionType(_fused_forward.__code__, _fused_forward.__globals__,
                                "forward", _fused_forward.__defaults__, _fused_forward.__closure__)
        sig = inspect.signature(original)
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        fn.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
        model.forward = types.MethodType(fn, model)
    model._mtp_ext_chunk_size = chunk_size
    return model


def remove_fused_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes use_fused_loss: the model's forward is its own again. Returns the model."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        if getattr(original, "__self__", None) is model and \
                original.__func__ is getattr(type(model), "forward", None):
            del model.forward  # the class's forward again
        else:
            model.forward = original  # the instance's own (e.g. a hook that wrapped it)
        model.__dict__.pop("_mtp_ext_chunk_size", None)
    return model


def is_fused(model: torch.nn.Module) -> bool:
    """Whether use_fused_loss is in effect on this model."""
    return _ORIGINAL in model.__dict__
