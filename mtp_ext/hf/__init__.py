"""Hugging Face transformers (the `hf` extra: pip install 'mtp_ext[hf]', which adds transformers).

- use_fused_loss(model): a causal LM computes its loss with the fused kernels, without logits.
- MTPForCausalLM.from_causal_lm(model, n_future): multi-token prediction heads on a pretrained
  causal LM, trained with mtp_loss, with self-speculative decoding.
- NativeMTPForCausalLM: a model's own MTP layers (config.num_mtp_layers: DeepSeek-V3, GLM-4.5,
  Mellum; transformers' MtpModel) trained with the fused loss, saved for generate(use_mtp=True).

See docs/hf.md.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("mtp_ext.hf needs transformers: pip install 'mtp_ext[hf]'") from e

from .fused_loss import (SUPPORTED, causal_lm_loss, is_fused, remove_fused_loss, softcap_of,
                         use_fused_loss)
from .mtp_model import MTPCausalLMOutput, MTPForCausalLM
from .native_mtp import NativeMTPForCausalLM

__all__ = ["SUPPORTED", "causal_lm_loss", "is_fused", "remove_fused_loss", "softcap_of",
           "use_fused_loss", "MTPForCausalLM", "MTPCausalLMOutput", "NativeMTPForCausalLM"]
