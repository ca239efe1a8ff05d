"""Inference for the latent-thought GPT: the exact sequential reference (reference.py) and KV-cached
generation (generate.py: `generate`, `decode_logits`; kv_decoder.py: the cache and its steps)."""

from megatron_latent.inference.generate import DecodeLogits, GenerationResult, decode_logits, generate
from megatron_latent.inference.kv_decoder import PREFILL_METHODS, LatentKVDecoder
from megatron_latent.inference.sampling import SamplingParams, sample

__all__ = [
    "DecodeLogits", "GenerationResult", "LatentKVDecoder", "PREFILL_METHODS", "SamplingParams",
    "decode_logits", "generate", "sample",
]
