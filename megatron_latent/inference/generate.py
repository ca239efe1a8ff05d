"""Generation with a KV cache (latent thoughts and every baseline method): prompts in, new tokens out.

    from megatron_latent.inference import PrefillParams, SamplingParams, generate
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16,
                   sampling=SamplingParams(),             # greedy; or temperature=, top_k=, ...
                   prefill=PrefillParams("exact"))      # or the default PrefillParams() (Jacobi at the model's J)
    out.ids            # new tokens per sample
    out.prefill_iters  # Jacobi passes the prefill used (None for exact)

`model` is a LatentGPTModel (any family and method: latent or interpolated thoughts, pause tokens,
extra loops, vanilla) on this rank, built at TP >= 1 without sequence or
pipeline parallelism; every tensor-parallel rank calls with the same prompts and gets the same
tokens (sampled tokens are broadcast from the group's first rank). Prompts of different lengths
are left-padded: padded entries are masked out of attention and each sample's position ids start
at 0 at its first real token, so a sample decodes as it would alone.

`decode_logits` teacher-forces given sequences through the same cache and returns every position's
logits: what the tests compare with the sequential reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from megatron.core import parallel_state as ps

from megatron_latent.inference.kv_decoder import LatentKVDecoder
from megatron_latent.inference.params import PrefillParams, SamplingParams
from megatron_latent.inference.sampling import make_generator, sample
from megatron_latent.models.latent import LatentGPTModel

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[int]]


@dataclass
class GenerationResult:
    ids: List[List[int]]  # new tokens per sample; with eod_id, cut after the first EOD (kept)
    prompt_ids: List[List[int]]
    prefill_iters: Optional[int]  # Jacobi passes of the prefill (None: exact)
    logits: Optional[torch.Tensor] = None  # [b, steps, vocab] (return_logits=True), gathered over TP


@dataclass
class DecodeLogits:
    logits: torch.Tensor  # [b, L, vocab] in the left-padded layout, gathered over TP
    valid: torch.Tensor  # [b, L] False at padding
    prefill_iters: Optional[int]


@dataclass
class _Batch:
    ids: torch.Tensor  # [b, L] left-padded
    positions: torch.Tensor  # [b, L]
    valid: torch.Tensor  # [b, L]
    prompts: List[List[int]]


@torch.no_grad()
def generate(
    model,
    prompt_ids: Prompts,
    max_new_tokens: int,
    *,
    sampling: SamplingParams = SamplingParams(),
    prefill: PrefillParams = PrefillParams(),
    eod_id: Optional[int] = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Generate `max_new_tokens` tokens after each prompt (fewer when every sample hit `eod_id`).

    prompt_ids: [b, P] LongTensor, a list of token lists (lengths may differ) or one token list.
    sampling: greedy (argmax, the default) or temperature / top-k / top-p from a torch.Generator
    seeded with its `seed`; its `vocab_size` keeps the padded output rows from being chosen.
    prefill: how the prompt's thoughts are found (Jacobi at the model's evaluation J, the default; see
    PrefillParams).
    """
    _check_model(model)
    _check_params(sampling=(sampling, SamplingParams), prefill=(prefill, PrefillParams))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    batch = _prepare(model, prompt_ids, extra_positions=max_new_tokens)
    b, p = batch.ids.shape
    decoder = LatentKVDecoder(model, b, p + max_new_tokens)
    hidden, iters = decoder.prefill(batch.ids, batch.positions, batch.valid, prefill)
    new = torch.empty(b, 0, dtype=torch.long, device=batch.ids.device)
    finished = torch.zeros(b, dtype=torch.bool, device=batch.ids.device)
    next_pos = batch.positions[:, -1:] + 1
    all_logits = []
    generator = make_generator(sampling, batch.ids.device)
    last_ids, last_pos = batch.ids[:, -1:], batch.positions[:, -1:]
    for k in range(max_new_tokens):
        logits = model.output(hidden[-1:], last_ids, last_pos, runtime_gather_output=True)[:, -1]
        if return_logits:
            all_logits.append(logits.float())
        token = _broadcast_tp(sample(logits, sampling, generator))
        if eod_id is not None:
            token = torch.where(finished, torch.full_like(token, eod_id), token)
            finished |= token == eod_id
        new = torch.cat([new, token[:, None]], dim=1)
        if k == max_new_tokens - 1 or bool(finished.all()):
            break
        last_ids, last_pos = token[:, None], next_pos
        hidden = decoder.step(last_ids, last_pos, torch.ones_like(last_ids, dtype=torch.bool))
        next_pos = next_pos + 1
    ids = [_cut_at_eod(row, eod_id) for row in new.tolist()]
    logits = torch.stack(all_logits, dim=1) if return_logits and all_logits else None
    return GenerationResult(ids=ids, prompt_ids=batch.prompts, prefill_iters=iters, logits=logits)


@torch.no_grad()
def decode_logits(
    model,
    input_ids: Prompts,
    decode_steps: Optional[int] = None,
    *,
    prefill: PrefillParams = PrefillParams(),
) -> DecodeLogits:
    """Teacher-forced logits of every position through the KV cache.

    The first L - decode_steps columns (of the left-padded batch) are the prompt, put in the cache
    by `prefill`; the last `decode_steps` tokens (default L - 1) are fed one cached step at a time.
    Logits [b, L, vocab] come from the output slot of every position, as the sequential reference's.
    """
    _check_model(model)
    _check_params(prefill=(prefill, PrefillParams))
    batch = _prepare(model, input_ids, extra_positions=0)
    b, length = batch.ids.shape
    steps = length - 1 if decode_steps is None else decode_steps
    if not 0 <= steps < length:
        raise ValueError(f"decode_steps must be in [0, {length - 1}] for sequences of {length} tokens, got {steps}")
    p = length - steps
    decoder = LatentKVDecoder(model, b, length)
    hidden, iters = decoder.prefill(batch.ids[:, :p], batch.positions[:, :p], batch.valid[:, :p], prefill)
    hiddens = [hidden]
    for t in range(p, length):
        hiddens.append(decoder.step(batch.ids[:, t:t + 1], batch.positions[:, t:t + 1], batch.valid[:, t:t + 1]))
    logits = model.output(torch.cat(hiddens), batch.ids, batch.positions, runtime_gather_output=True)
    return DecodeLogits(logits=logits, valid=batch.valid, prefill_iters=iters)


# ------------------------------------------------------------------------------------ helpers
def _check_model(model):
    if not isinstance(model, LatentGPTModel):
        raise TypeError(f"generation needs a LatentGPTModel, got {type(model).__name__}")
    if not (model.pre_process and model.post_process):
        raise ValueError("generation runs with pipeline_model_parallel_size 1 (the whole model on this rank)")
    if model.config.sequence_parallel:
        raise ValueError("generation runs without sequence_parallel")
    if model.training:
        raise ValueError("generation needs model.eval() (dropout would make decoding random)")


def _check_params(**given):
    """`name=(value, expected class)`: generation takes its parameter groups whole."""
    for name, (value, cls) in given.items():
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__} {value!r}")


def _prepare(model, prompt_ids: Prompts, extra_positions: int) -> _Batch:
    """Left-pad prompts; positions start at 0 at each sample's first real token (0 on padding)."""
    device = model.embedding.word_embeddings.weight.device
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(f"prompt_ids tensor must be [batch, length] integers, got {tuple(prompt_ids.shape)} "
                             f"{prompt_ids.dtype}")
        prompts = prompt_ids.tolist()
    else:
        prompts = list(prompt_ids)
        if prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]
        prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (got an empty prompt)")
    vocab = model.token_vocab_size  # the tokenizer's rows: not the padding, not the pause token
    for i, p in enumerate(prompts):
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} is outside the model's vocabulary [0, {vocab})")
    longest = max(len(p) for p in prompts)
    if model.position_embedding_type == "learned_absolute" and longest + extra_positions > model.max_sequence_length:
        raise ValueError(
            f"prompt of {longest} tokens + {extra_positions} new tokens exceeds the model's "
            f"{model.max_sequence_length} learned positions (seq_length)"
        )
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return _Batch(ids.to(device), positions.to(device), valid.to(device), prompts)


def _broadcast_tp(token):
    """Every tensor-parallel rank continues with the tokens of the group's first rank."""
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(token, src=ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    return token


def _cut_at_eod(row: List[int], eod_id: Optional[int]) -> List[int]:
    if eod_id is not None and eod_id in row:
        return row[: row.index(eod_id) + 1]
    return row
