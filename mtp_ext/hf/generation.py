"""transformers' generate arguments for MTPForCausalLM.generate: a GenerationConfig (the given
one, else the model's own) and keyword arguments over it, resolved to what mtp_ext.decoding.generate
takes, with the output shaped as transformers shapes it (left-padded prompts kept as they are,
`pad_token_id` after each sequence's end). An argument it cannot honour is a ValueError naming
it, never silently ignored."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

import torch

# transformers' defaults for the fields left unset (GenerationConfig._get_default_generation_params)
_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
             "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
             "length_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
             "min_length": 0, "output_scores": False, "return_dict_in_generate": False,
             "output_attentions": False, "output_hidden_states": False, "output_logits": False,
             "use_cache": True, "early_stopping": False, "epsilon_cutoff": 0.0,
             "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
             "encoder_no_repeat_ngram_size": 0, "remove_invalid_values": False,
             "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
             "assistant_confidence_threshold": 0.4}
SUPPORTED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
             "eos_token_id", "pad_token_id", "return_dict_in_generate")
# Fields that change nothing here: token ids of other roles, bookkeeping, the cache (ours),
# and the speculative-decoding knobs of transformers' assistants (the heads draft here).
_IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version",
            "_from_model_config", "use_cache", "cache_implementation", "num_assistant_tokens",
            "num_assistant_tokens_schedule", "assistant_confidence_threshold", "generation_mode"}


@dataclass
class Settings:
    max_new_tokens: int
    temperature: float          # 0: greedy
    top_k: Optional[int]
    top_p: float
    eos: List[int]
    pad: int
    return_dict: bool


def resolve(model_config, generation_config, kwargs: dict, prompt_length: int) -> Settings:
    """The settings of one generate call: generation_config (None: the model's own) updated by
    kwargs, as transformers merges them. ValueError naming any argument or set field that this
    decoding does not support."""
    from transformers import GenerationConfig
    config = copy.deepcopy(generation_config if generation_config is not None
                           else (model_config or GenerationConfig()))
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(f"MTPForCausalLM.generate: {', '.join(sorted(unknown))} not supported "
                         f"(it takes {', '.join(SUPPORTED)}, a GenerationConfig, speculative, "
                         f"generator and attention_mask)")
    values = {k: v for k, v in config.to_dict().items() if v is not None}
    sample = bool(values.get("do_sample", False))
    unsupported = [f"{k}={v!r}" for k, v in sorted(values.items())
                   if k not in SUPPORTED and k not in _IGNORED
                   and (k not in _DEFAULTS or v != _DEFAULTS[k])
                   and not (isinstance(v, (dict, list)) and not v)]
    if unsupported:
        raise ValueError(f"MTPForCausalLM.generate: {', '.join(unsupported)} not supported "
                         f"(greedy or sampled decoding, one sequence per prompt; it takes "
                         f"{', '.join(SUPPORTED)})")
    new = values.get("max_new_tokens")
    if new is None:
        new = values.get("max_length", _DEFAULTS["max_length"]) - prompt_length
        if new < 0:
            raise ValueError(f"MTPForCausalLM.generate: max_length {values.get('max_length')} "
                             f"is shorter than the prompt ({prompt_length}): pass max_new_tokens")
    eos = values.get("eos_token_id")
    eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(t) for t in eos])
    pad = values.get("pad_token_id")
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)  # transformers: eos as pad
    return Settings(int(new), float(values.get("temperature", 1.0)) if sample else 0.0,
                    values.get("top_k", _DEFAULTS["top_k"]) if sample else None,
                    float(values.get("top_p", 1.0)) if sample else 1.0, eos, pad,
                    bool(values.get("return_dict_in_generate", False)))


def prompts_of(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """Each row's prompt (its unpadded tokens): left padding per attention_mask, or none."""
    if attention_mask is None:
        return [input_ids[b:b + 1] for b in range(input_ids.shape[0])]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
                         f"input_ids {tuple(input_ids.shape)}")
    m = attention_mask.bool()
    lens = m.sum(1)
    P = input_ids.shape[1]
    left = torch.arange(P, device=m.device)[None, :] >= (P - lens)[:, None]
    if not torch.equal(m, left) or bool((lens == 0).any()):
        raise ValueError("attention_mask: each row must be its prompt's tokens at the right end "
                         "(left padding, as transformers pads for generation), with at least "
                         "one token")
    return [input_ids[b:b + 1, P - int(lens[b]):] for b in range(input_ids.shape[0])]


def sequences(input_ids: torch.Tensor, outs, pad: int) -> torch.Tensor:
    """transformers' output: each input row as it was given (its left padding kept), then its
    generated tokens, pad_token_id after its end."""
    B, P = input_ids.shape
    made = [int(o.sequence_tokens[0]) for o in outs]
    new = max(made, default=0)
    out = torch.full((B, P + new), pad, dtype=input_ids.dtype, device=input_ids.device)
    out[:, :P] = input_ids
    for b, (o, k) in enumerate(zip(outs, made)):
        start = o.tokens.shape[1] - o.new_tokens
        out[b, P:P + k] = o.tokens[0, start:start + k]
    return out
