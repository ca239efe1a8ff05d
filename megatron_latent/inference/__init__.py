"""Inference for the latent-thought GPT: the exact sequential reference (reference.py) and KV-cached
generation (generate.py: `generate`, `decode_logits`; params.py: what they take; kv_decoder.py: the
cache and its steps)."""

from megatron_latent.inference.generate import DecodeLogits, GenerationResult, decode_logits, generate
from megatron_latent.inference.kv_decoder import LatentKVDecoder
from megatron_latent.inference.params import PREFILL_MODES, PrefillParams, SamplingParams
from megatron_latent.inference.sampling import sample

__all__ = [
    "DecodeLogits", "GenerationResult", "LatentKVDecoder", "PREFILL_MODES", "PrefillParams", "SamplingParams",
    "decode_logits", "generate", "sample",
]
