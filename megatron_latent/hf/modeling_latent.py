"""PonderLM-2 latent-thought causal LMs on the stock transformers classes.

This file ships inside exported Hugging Face folders (loaded with ``trust_remote_code=True``) and
imports only torch and transformers. Each token is followed by N latent thoughts: thought k of
position i is the post-final-norm hidden state of slot k-1 of the same position, fed back as the
next input vector (``inputs_embeds``) at the same position id. Logits come from slot N.
With ``scale_embeds`` token embeddings are multiplied by sqrt(2.5 * hidden_size). The config keys
are the authors' (LUMIA-Group/PonderLM-2) with their meaning; ``recurrent_model`` false (their
vanilla forward) is refused. Works with
transformers 4.46 and later (4.x GPT-2 keeps tuple caches: converted at the call). With learned
positions (GPT-2) the stock model adds the position embedding to every slot, thoughts included.
Families: GPT-2, GPT-NeoX, LLaMA (Llama-3.x rope scaling included), Qwen2 (Qwen2.5) and Qwen3
(transformers 4.51 and later).

``forward`` takes token-level ``input_ids`` / ``attention_mask`` (so lm-evaluation-harness and
``generate`` work unchanged) and keeps N+1 slot-level entries per token in the KV cache:

* no cache yet (prefill / scoring): ``latent_prefill`` chooses how the prompt's thoughts are
  found: ``"jacobi"`` (N growth passes, ``num_jacobi_iterations`` Jacobi passes and a final pass,
  exactly the training-time evaluation forward), ``"exact"`` (sequential, one slot at a time, with
  the cache), or ``"tolerance"`` (Jacobi until the thoughts move by at most ``jacobi_tolerance``,
  at most ``max_jacobi_iterations`` passes; the count used is returned as ``jacobi_iterations``).
* with a cache (decoding): every new token is exact: the token step, then N thought steps at the
  same position, each a single-slot step through the cache.

The baselines share this class (keys in hf/authors.py of the exporting project):

* ``interpolation`` true: a thought is not the hidden state but the output softmax's mix of the
  embeddings, ``softmax(lm_head(h)) @ E`` times the embedding scale (``interpolation_use_topk``:
  over the ``interpolation_topk`` likeliest tokens only), in the same slot layout and prefill modes.
* ``num_pause_tokens`` K: every token is followed by K inputs of the pause embedding (row
  ``pause_token_id``, the last of the vocabulary) at its position id; logits from the last pause.
  Nothing is fed back, so prefill and decoding are one pass over the new slots (K+1 cache entries
  per token).
* ``num_extra_loops`` K: the layer stack runs K+1 times, each run's output before the final norm
  being the next run's input (the final norm once, at the end; GPT-2's position embedding only
  added to the tokens). Each run has its own keys and values: one cache holds them all, run p's
  layers at cache layers (K-p)*L.. (the attention modules' ``layer_idx`` is offset per run; the
  last run keeps layers 0..L-1, whose length the base model reads as the tokens seen).
* ``num_ponder_steps`` K (PonderLM): K+1 whole forwards over the tokens, each with the final
  norm; the next forward's input is the token embedding (``residual_interpolated_embeds``: the
  current input) plus ``softmax(lm_head(h)) @ E`` times the embedding scale
  (``ponder_feedback`` "interpolated", the authors' modeling_llama_orin.py), or the current input
  plus h ("hidden", their modeling_gpt_neox_addhidden.py). Each forward has its own cache layers,
  as a loop's runs do.
* ``embedding_scale_factor``: embeddings are scaled by sqrt(factor * hidden_size) with
  ``scale_embeds`` (2.5 latent and loops, 1 pause and interpolated: the authors' code).
"""



from __future__ import annotations

import contextlib
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
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers >= 4.51
    from transformers import Qwen3Config, Qwen3ForCausalLM
except ImportError:
    Qwen3Config = None
try:  # transformers 5: caches made of layers
    from transformers.cache_utils import DynamicLayer
except ImportError:
    DynamicLayer = None
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
    interpolation_use_topk=False,
    interpolation_topk=0,
    num_pause_tokens=0,
    pause_token_id=None,
    num_extra_loops=0,
    num_ponder_steps=0,
    ponder_feedback="interpolated",
    residual_interpolated_embeds=False,
    embedding_scale_factor=None,  # None: 2.5 (1.0 with interpolation, as the authors' scale_embeds)
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
LatentQwen2Config = _latent_config(Qwen2Config)


def _new_cache(config):
    return _growing(DynamicCache(config=config) if _CACHE_TAKES_CONFIG else DynamicCache())


if DynamicLayer is not None:
    class _GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of buffers with room to grow: appending
        a slot writes that slot only, where the stock layer concatenates (copies) the whole cache.
        A latent token appends N+1 times, so the stock layer would copy N+1 times the bytes of a
        vanilla model's cache per token. The buffers grow by a quarter when full (amortised: a few
        entries copied per append). Anything that replaces `keys` (crop, reorder, reset) is seen
        and the buffers rebuilt from it."""

        _buffers = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, new = self.get_seq_length(), key_states.shape[-2]
            bk = self._buffers[0] if self._buffers is not None else None
            # Still the view this layer handed out (not a tensor some other method put there)?
            fresh = (bk is None or n + new > bk.shape[-2] or self.keys.data_ptr() != bk.data_ptr()
                     or self.keys.stride() != bk.stride() or self.keys.shape[:-2] != bk.shape[:-2])
            if fresh:
                room = n + new + max(16, (n + new) // 4)
                bk = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
                bv = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
                if n:
                    bk[..., :n, :], bv[..., :n, :] = self.keys, self.values
                self._buffers = (bk, bv)
            bk, bv = self._buffers
            bk[..., n:n + new, :], bv[..., n:n + new, :] = key_states, value_states
            self.keys, self.values = bk[..., :n + new, :], bv[..., :n + new, :]
            return self.keys, self.values


def _growing(cache):
    """Let `cache` (a transformers 5 DynamicCache, possibly the one `generate` made) append
    without copying: its stock layers become _GrowingLayer (same state, same reads)."""
    if DynamicLayer is None:
        return cache
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = _GrowingLayer
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = _GrowingLayer
    return cache


def _reserve_layers(cache, count):
    """Make room for `count` cache layers (extra loops: L per run) in a cache built for L layers
    (transformers 5 builds one layer per model layer from the config; 4.x caches grow by index)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and getattr(cache, "layer_class_to_replicate", None) is None:
        while len(layers) < count:
            layers.append(type(layers[0])())


class _NoPositions(torch.nn.Module):
    """GPT-2's position embedding for the runs after the first of an extra-loop model: zeros."""

    def __init__(self, wpe):
        super().__init__()
        self.width, self.dtype = wpe.weight.shape[1], wpe.weight.dtype

    def forward(self, position_ids):
        return torch.zeros(*position_ids.shape, self.width, dtype=self.dtype, device=position_ids.device)


class LatentMixin:
    """The latent forward over any stock *ForCausalLM whose base model returns post-norm states."""

    def __init__(self, config, *args, **kwargs):
        if not config.recurrent_model:
            raise ValueError("config recurrent_model false: the authors' code would run the vanilla forward; "
                             "load the folder with the stock class instead")
        on = [k for k in ("num_latent_thoughts", "num_pause_tokens", "num_extra_loops", "num_ponder_steps")
              if getattr(config, k)]
        if len(on) > 1:
            raise ValueError(f"config {' and '.join(on)}: latent thoughts, pause tokens, extra loops and pondering "
                             "are exclusive")
        if config.ponder_feedback not in ("interpolated", "hidden"):
            raise ValueError(f"config ponder_feedback {config.ponder_feedback!r}: interpolated or hidden")
        if config.num_pause_tokens and config.pause_token_id != config.vocab_size - 1:
            raise ValueError(f"config pause_token_id {config.pause_token_id!r}: expected the last row, "
                             f"{config.vocab_size - 1}")
        super().__init__(config, *args, **kwargs)
        # Extra loops offset the attention modules' cache index per run (see the module docstring).
        self._latent_attention = [(m, m.layer_idx) for m in self.base_model.modules()
                                  if isinstance(getattr(m, "layer_idx", None), int)]

    # ------------------------------------------------------------------------------ pieces
    @property
    def num_slots(self) -> int:
        """Cache entries per token: the token and its N thoughts (or K pauses)."""
        return max(int(self.config.num_latent_thoughts), int(self.config.num_pause_tokens)) + 1

    @property
    def embedding_scale(self) -> float:
        c = self.config
        if not c.scale_embeds:
            return 1.0
        factor = c.embedding_scale_factor
        if factor is None:
            factor = 1.0 if c.interpolation or c.num_ponder_steps else 2.5
        return math.sqrt(factor * c.hidden_size)

    def thought_vectors(self, hidden):
        """The input of the slot after one whose post-norm hidden state is `hidden` [..., h]: the
        state itself, or with interpolation the embeddings mixed by its output softmax."""
        if not self.config.interpolation:
            return hidden
        return self._mix(hidden, int(self.config.interpolation_topk) if self.config.interpolation_use_topk else 0)

    def ponder_vectors(self, tokens, current, hidden):
        """The input of the pondering forward after one over `current` whose output is `hidden`."""
        c = self.config
        if c.ponder_feedback == "hidden":
            return current + hidden
        return (current if c.residual_interpolated_embeds else tokens) + self._mix(hidden, 0)

    def _mix(self, hidden, topk):
        """softmax(lm_head(hidden)) @ E times the embedding scale (over the `topk` likeliest tokens)."""
        logits = F.linear(hidden, self.get_output_embeddings().weight)
        if topk:
            k = min(topk, logits.shape[-1])
            kth = logits.topk(k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))  # ties at the k-th value kept
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        mixed = e @ self.get_input_embeddings().weight.to(e.dtype)
        return (mixed / e.sum(dim=-1, keepdim=True) * self.embedding_scale).to(hidden.dtype)

    def slot_vectors(self, tokens):
        """[b, q, slots, h] inputs of slots that need no earlier output: the tokens, and with
        pause tokens the K pause embeddings after each."""
        k = int(self.config.num_pause_tokens)
        if not k:
            return tokens[:, :, None]
        pause = self.get_input_embeddings().weight[self.config.pause_token_id] * self.embedding_scale
        return torch.cat([tokens[:, :, None], pause.to(tokens.dtype).expand(*tokens.shape[:2], k, -1)], dim=2)

    def _cache_arg(self) -> str:
        # The base model's name for the cache argument (`cache` from transformers 5.x, else the old one).
        name = getattr(self, "_latent_cache_arg", None)
        if name is None:
            params = inspect.signature(self.base_model.forward).parameters
            name = self._latent_cache_arg = "cache" if "cache" in params else "past_key_values"
        return name

    def token_vectors(self, input_ids):
        e = self.get_input_embeddings()(input_ids)
        return e * self.embedding_scale if self.config.scale_embeds else e

    def decoder_pass(self, inputs, position_ids, slot_mask, cache=None):
        """Post-norm hidden states [b, S, h] of slot inputs [b, S, h] (extra loops: after all the
        runs of the layer stack). The 2D mask is always passed: without one transformers would
        read the repeated position ids as packed sequences."""
        ponder = int(self.config.num_ponder_steps)
        runs = int(self.config.num_extra_loops) + ponder + 1
        if runs == 1:
            return self._base_pass(inputs, position_ids, slot_mask, cache)
        layers = int(self.config.num_hidden_layers)
        if cache is not None:
            _reserve_layers(cache, runs * layers)
        x = inputs
        for p in range(runs):
            offset = (runs - 1 - p) * layers
            with self._loop_run(offset, first=p == 0 or ponder, last=p == runs - 1 or ponder):
                h = self._base_pass(x, position_ids, slot_mask, cache, offset)
            x = self.ponder_vectors(inputs, x, h) if ponder else h
        return h

    @contextlib.contextmanager
    def _loop_run(self, offset, first, last):
        """One run of an extra-loop model (or one pondering forward, which is `first` and `last`
        of its own): its own cache layers; the final norm only on the last run; GPT-2's position
        embedding only on the first (the later runs' inputs carry it)."""
        base, swapped = self.base_model, []
        for m, idx in self._latent_attention:
            m.layer_idx = idx + offset
        if not last:
            name = next(n for n in ("norm", "final_layer_norm", "ln_f") if hasattr(base, n))
            swapped.append((name, getattr(base, name)))
            setattr(base, name, torch.nn.Identity())
        if not first and hasattr(base, "wpe"):
            swapped.append(("wpe", base.wpe))
            base.wpe = _NoPositions(base.wpe)
        try:
            yield
        finally:
            for name, module in swapped:
                setattr(base, name, module)
            for m, idx in self._latent_attention:
                m.layer_idx = idx

    def _base_pass(self, inputs, position_ids, slot_mask, cache=None, layer_offset=0):
        if cache is not None and getattr(self, "_supports_cache_class", True) is False:
            return self._tuple_cache_pass(inputs, position_ids, slot_mask, cache, layer_offset)
        kw = {self._cache_arg(): cache} if cache is not None else {}
        out = self.base_model(
            inputs_embeds=inputs, position_ids=position_ids, attention_mask=slot_mask,
            use_cache=cache is not None, **kw,
        )
        return out.last_hidden_state

    def _tuple_cache_pass(self, inputs, position_ids, slot_mask, cache, layer_offset=0):
        """decoder_pass for base models that take tuple caches (GPT-2 in transformers 4.x): the
        DynamicCache is handed over as tuples and gets the new entries appended."""
        layers = int(self.config.num_hidden_layers)
        past = cache.to_legacy_cache()[layer_offset:layer_offset + layers] if cache.get_seq_length() else None
        out = self.base_model(inputs_embeds=inputs, position_ids=position_ids, attention_mask=slot_mask,
                              past_key_values=past, use_cache=True)
        new = inputs.shape[1]
        for layer, (k, v) in enumerate(out.past_key_values):
            cache.update(k[:, :, -new:], v[:, :, -new:], layer_offset + layer)
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
            stages = [tokens] + [self.thought_vectors(out[:, :, j]) * keep for j in range(g)]
        iters = 0
        if n:
            limit = num_jacobi if tolerance is None else (max_iters if max_iters is not None else n * length)
            while iters < limit:
                out = run(stages)
                new = [self.thought_vectors(out[:, :, j]) * keep for j in range(n)]
                # The change is only read (a device sync) when a tolerance asks for it.
                done = tolerance is not None and max(
                    (a - o).abs().max().item() for a, o in zip(new, stages[1:])) <= tolerance
                stages, iters = [tokens] + new, iters + 1
                if done:
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
                h = self.decoder_pass(x, pos, slot_mask[:, :end], cache)
                if a + 1 < self.num_slots:  # the last slot feeds nothing (interpolated: no vocabulary mix)
                    x = self.thought_vectors(h) * keep
            outs.append(h)
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
        num_logits_to_keep=None,
        latent_prefill=None,
        num_jacobi_iterations=None,
        jacobi_tolerance=None,
        max_jacobi_iterations=None,
        return_dict=None,
        **kwargs,
    ):
        """Token-level interface of the stock model. `attention_mask` [b, past + q] (1 = token,
        0 = padding) covers the cached tokens too; `position_ids` default to its running count.
        `logits_to_keep` k > 0 (transformers 4.x: `num_logits_to_keep`): logits of the last k tokens
        only, as `generate` asks for (the output layer then runs once per sample, not per token)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("the latent model takes input_ids (token embeddings are scaled inside)")
        cache = _growing(cache if cache is not None else past_key_values)
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
        if not self.config.num_latent_thoughts:
            # Nothing fed back (vanilla, pause tokens, extra loops): one pass over the new slots.
            if use_cache and cache is None:
                cache = _new_cache(self.config)
            x = self.slot_vectors(tokens).flatten(1, 2)
            out = self.decoder_pass(x, position_ids.repeat_interleave(k, 1), slot_mask, cache if use_cache else None)
            hidden = out.unflatten(1, (q, k))[:, :, k - 1]
        elif past or mode == "exact":
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
        if num_logits_to_keep is not None and not logits_to_keep:
            logits_to_keep = num_logits_to_keep
        if isinstance(logits_to_keep, torch.Tensor):  # the positions to keep, as the stock models take
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep > 0:
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
                    "max_jacobi_iterations", "logits_to_keep", "num_logits_to_keep"):
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


class LatentQwen2ForCausalLM(LatentMixin, Qwen2ForCausalLM):
    config_class = LatentQwen2Config


if Qwen3Config is not None:
    LatentQwen3Config = _latent_config(Qwen3Config)

    class LatentQwen3ForCausalLM(LatentMixin, Qwen3ForCausalLM):
        config_class = LatentQwen3Config
