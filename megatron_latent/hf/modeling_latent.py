"""PonderLM-2 latent-thought causal LMs on the stock transformers classes.

This file ships inside exported Hugging Face folders (loaded with ``trust_remote_code=True``) and
imports only torch and transformers. Each token is followed by N latent thoughts: thought k of
position i is the post-final-norm hidden state of slot k-1 of the same position, fed back as the
next input vector (``inputs_embeds``) at the same position id. Logits come from slot N.
With ``scale_embeds`` token embeddings are multiplied by sqrt(2.5 * hidden_size). The config keys
are the authors' (LUMIA-Group/PonderLM-2) with their meaning; ``interpolation`` true (their
PonderLM-1 mode) and ``recurrent_model`` false (their vanilla forward) are refused. Works with
transformers 4.46 and later (4.x GPT-2 keeps tuple caches: converted at the call). With learned
positions (GPT-2) the stock model adds the position embedding to every slot, thoughts included.

``forward`` takes token-level ``input_ids`` / ``attention_mask`` (so lm-evaluation-harness and
``generate`` work unchanged) and keeps N+1 slot-level entries per token in the KV cache:

* no cache yet (prefill / scoring): ``latent_prefill`` chooses how the prompt's thoughts are
  found: ``"jacobi"`` (N growth passes, ``num_jacobi_iterations`` Jacobi passes and a final pass,
  exactly the training-time evaluation forward), ``"exact"`` (sequential, one slot at a time, with
  the cache), or ``"tolerance"`` (Jacobi until the thoughts move by at most ``jacobi_tolerance``,
  at most ``max_jacobi_iterations`` passes; the count used is returned as ``jacobi_iterations``).
* with a cache (decoding): every new token is exact: the token step, then N thought steps at the
  same position, each a single-slot step through the cache.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers 5
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming
except ImportError:
    register_checkpoint_conversion_mapping = None

PREFILL_MODES = ("jacobi", "exact", "tolerance")
_LATENT_DEFAULTS = dict(
    num_latent_thoughts=1,
    num_jacobi_iterations=3,
    random_jacobi_iterations=False,  # training only: J drawn from the family range
    jacobi_iters_range=None,  # training only: our exact range when theirs cannot say it
    scale_embeds=True,
    interpolation=False,
    recurrent_model=True,
    latent_prefill="jacobi",
    jacobi_tolerance=1e-4,
    max_jacobi_iterations=None,  # None: N * prompt length, enough for the exact fixed point
)
_CACHE_TAKES_CONFIG = "config" in inspect.signature(DynamicCache.__init__).parameters  # 5.x
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class LatentCausalLMOutput(CausalLMOutputWithPast):
    """The stock output plus the number of Jacobi passes the prefill ran (None: no Jacobi)."""

    jacobi_iterations: Optional[int] = None


def _latent_config(base):
    class Config(base):
        model_type = "latent_" + base.model_type

        def __init__(self, **kwargs):
            for key, value in _LATENT_DEFAULTS.items():
                setattr(self, key, kwargs.pop(key, value))
            super().__init__(**kwargs)

    Config.__name__ = Config.__qualname__ = "Latent" + base.__name__
    return Config


LatentGPT2Config = _latent_config(GPT2Config)
LatentGPTNeoXConfig = _latent_config(GPTNeoXConfig)
LatentLlamaConfig = _latent_config(LlamaConfig)


def _new_cache(config):
    return DynamicCache(config=config) if _CACHE_TAKES_CONFIG else DynamicCache()


class LatentMixin:
    """The latent forward over any stock *ForCausalLM whose base model returns post-norm states."""

    def __init__(self, config, *args, **kwargs):
        if config.interpolation:
            raise ValueError("config interpolation true: PonderLM-1 interpolated embeddings are not implemented here")
        if not config.recurrent_model:
            raise ValueError("config recurrent_model false: the authors' code would run the vanilla forward; "
                             "load the folder with the stock class instead")
        super().__init__(config, *args, **kwargs)

    # ------------------------------------------------------------------------------ pieces
    @property
    def num_slots(self) -> int:
        return int(self.config.num_latent_thoughts) + 1

    def _cache_arg(self) -> str:
        # The base model's name for the cache argument (`cache` from transformers 5.x, else the old one).
        name = getattr(self, "_latent_cache_arg", None)
        if name is None:
            params = inspect.signature(self.base_model.forward).parameters
            name = self._latent_cache_arg = "cache" if "cache" in params else "past_key_values"
        return name

    def token_vectors(self, input_ids):
        e = self.get_input_embeddings()(input_ids)
        if self.config.scale_embeds:
            e = e * math.sqrt(2.5 * self.config.hidden_size)
        return e

    def decoder_pass(self, inputs, position_ids, slot_mask, cache=None):
        """Post-norm hidden states [b, S, h] of slot inputs [b, S, h]. The 2D mask is always passed:
        without one transformers would read the repeated position ids as packed sequences."""
        if cache is not None and getattr(self, "_supports_cache_class", True) is False:
            return self._tuple_cache_pass(inputs, position_ids, slot_mask, cache)
        kw = {self._cache_arg(): cache} if cache is not None else {}
        out = self.base_model(
            inputs_embeds=inputs, position_ids=position_ids, attention_mask=slot_mask,
            use_cache=cache is not None, **kw,
        )
        return out.last_hidden_state

    def _tuple_cache_pass(self, inputs, position_ids, slot_mask, cache):
        """decoder_pass for base models that take tuple caches (GPT-2 in transformers 4.x): the
        DynamicCache is handed over as tuples and gets the new entries appended."""
        past = cache.to_legacy_cache() if cache.get_seq_length() else None
        out = self.base_model(inputs_embeds=inputs, position_ids=position_ids, attention_mask=slot_mask,
                              past_key_values=past, use_cache=True)
        new = inputs.shape[1]
        for layer, (k, v) in enumerate(out.past_key_values):
            cache.update(k[:, :, -new:], v[:, :, -new:], layer)
        return out.last_hidden_state

    # -------------------------------------------------------------------------- prefill modes
    def jacobi_hidden(self, tokens, positions, mask, num_jacobi=None, tolerance=None, max_iters=None, cache=None):
        """Hidden states [b, L, h] at slot N after growth, Jacobi and final passes.

        Fixed `num_jacobi` passes, or (tolerance given) passes until the largest change of any
        thought is <= tolerance. Returns (hidden, Jacobi passes run). The final pass fills `cache`.
        """
        n, length = self.num_slots - 1, tokens.shape[1]
        keep = mask[..., None].to(tokens.dtype)  # thoughts of padding positions are zeroed

        def run(stages, cache=None):
            g = len(stages)
            x = torch.stack(stages, dim=2).flatten(1, 2)
            out = self.decoder_pass(x, positions.repeat_interleave(g, 1), mask.repeat_interleave(g, 1), cache)
            return out.unflatten(1, (length, g))

        stages = [tokens]
        for g in range(1, n + 1):  # growth: pass g sees g stages, then holds g thoughts
            out = run(stages)
            stages = [tokens] + [out[:, :, j] * keep for j in range(g)]
        iters = 0
        if n:
            limit = num_jacobi if tolerance is None else (max_iters if max_iters is not None else n * length)
            while iters < limit:
                out = run(stages)
                new = [out[:, :, j] * keep for j in range(n)]
                delta = max((a - o).abs().max().item() for a, o in zip(new, stages[1:]))
                stages, iters = [tokens] + new, iters + 1
                if tolerance is not None and delta <= tolerance:
                    break
        return run(stages, cache)[:, :, n], iters

    def exact_hidden(self, tokens, positions, slot_mask, cache):
        """Exact sequential rollout of new tokens [b, q, h] through `cache`: per token the token
        step, then N thought steps at the same position. `slot_mask` covers cache + new slots."""
        past, outs = cache.get_seq_length(), []
        for t in range(tokens.shape[1]):
            x, pos = tokens[:, t : t + 1], positions[:, t : t + 1]
            keep = slot_mask[:, past + t * self.num_slots, None, None].to(tokens.dtype)
            for a in range(self.num_slots):
                end = past + t * self.num_slots + a + 1
                x = self.decoder_pass(x, pos, slot_mask[:, :end], cache) * keep
            outs.append(x)
        return torch.cat(outs, dim=1)

    # --------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        latent_prefill=None,
        num_jacobi_iterations=None,
        jacobi_tolerance=None,
        max_jacobi_iterations=None,
        return_dict=None,
        **kwargs,
    ):
        """Token-level interface of the stock model. `attention_mask` [b, past + q] (1 = token,
        0 = padding) covers the cached tokens too; `position_ids` default to its running count."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("the latent model takes input_ids (token embeddings are scaled inside)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        k = self.num_slots
        b, q = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if past % k:
            raise ValueError(f"cache holds {past} entries, not a multiple of {k} slots per token")
        past //= k
        if attention_mask is None:
            attention_mask = torch.ones(b, past + q, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + q:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected {past + q}")
        mask = attention_mask.bool()
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        tokens = self.token_vectors(input_ids)
        slot_mask = mask.repeat_interleave(k, dim=1)

        mode = latent_prefill or self.config.latent_prefill
        if mode not in PREFILL_MODES:
            raise ValueError(f"latent_prefill {mode!r}: one of {', '.join(PREFILL_MODES)}")
        iters = None
        if past or mode == "exact":
            if cache is None:
                cache = _new_cache(self.config)
            hidden = self.exact_hidden(tokens, position_ids, slot_mask, cache)
        else:
            if use_cache and cache is None:
                cache = _new_cache(self.config)
            tol = None
            if mode == "tolerance":
                tol = self.config.jacobi_tolerance if jacobi_tolerance is None else jacobi_tolerance
            hidden, iters = self.jacobi_hidden(
                tokens, position_ids, mask[:, past:],
                num_jacobi=(self.config.num_jacobi_iterations if num_jacobi_iterations is None
                            else num_jacobi_iterations),
                tolerance=tol,
                max_iters=(max_jacobi_iterations if max_jacobi_iterations is not None
                           else self.config.max_jacobi_iterations),
                cache=cache if use_cache else None,
            )
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return LatentCausalLMOutput(
            loss=loss, logits=logits, jacobi_iterations=iters, **{_CACHE_FIELD: cache if use_cache else None}
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        """Feed the tokens the cache has not seen (the cache holds N+1 entries per token)."""
        cache = cache if cache is not None else past_key_values
        done = 0 if cache is None else cache.get_seq_length() // self.num_slots
        inputs = {"input_ids": input_ids[:, done:], "attention_mask": attention_mask, _CACHE_FIELD: cache}
        for key in ("use_cache", "latent_prefill", "num_jacobi_iterations", "jacobi_tolerance",
                    "max_jacobi_iterations"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs


class LatentGPT2LMHeadModel(LatentMixin, GPT2LMHeadModel):
    config_class = LatentGPT2Config


class LatentGPTNeoXForCausalLM(LatentMixin, GPTNeoXForCausalLM):
    config_class = LatentGPTNeoXConfig


if register_checkpoint_conversion_mapping is not None:
    # transformers 5 renames the files' `embed_out` (the name 4.x reads) to `lm_head` for its own
    # class only; remote-code subclasses must ask for it.
    register_checkpoint_conversion_mapping(
        LatentGPTNeoXForCausalLM.__name__, [WeightRenaming(r"^embed_out\.", "lm_head.")], overwrite=True)


class LatentLlamaForCausalLM(LatentMixin, LlamaForCausalLM):
    config_class = LatentLlamaConfig
