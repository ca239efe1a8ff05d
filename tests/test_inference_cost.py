"""The exported model's inference does the work models.flops says and no more, counted by torch's
FlopCounterMode (eager attention: QK^T and AV are matmuls over the full score matrix, as
models.flops counts them): a prompt costs the evaluation forward's passes and the output layer
once per sample (generate keeps only the last position's logits), a cached token costs its N+1
single-slot steps and the output layer once (the thought slots get no logits)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_latent.models.flops import model_decode_flops, model_step_flops
from tiny import small_config

B, P = 2, 6
VOCAB = 256


def _hf(n, prefill="jacobi", **kw):
    from megatron_latent.hf import modeling_latent as ml
    from megatron_latent.hf.export import _LATENT_CLASSES, _LATENT_CONFIGS, hf_config_dict

    # Vocabulary 256, no padded rows: the exported model's output layer is the one counted.
    cfg = small_config("llama", n, ffn_hidden_size=48, scale_embeddings=True, vocab_size=VOCAB, **kw)
    conf = getattr(ml, _LATENT_CONFIGS[cfg.arch]).from_dict(hf_config_dict(cfg))
    conf.latent_prefill = prefill
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    return cfg, getattr(ml, _LATENT_CLASSES[cfg.arch])(conf).eval()


def _prompt():
    return torch.randint(0, VOCAB, (B, P), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("n", [1, 2])
def test_generate_prefill_costs_the_forward_passes_and_one_output_layer(n):
    cfg, hf = _hf(n)
    assert hf.config.vocab_size == cfg.padded_vocab_size  # one output layer on both sides
    out_layer = 2 * cfg.hidden_size * cfg.padded_vocab_size
    ids = _prompt()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                          pad_token_id=0, return_dict_in_generate=True)
    # The cache generate made appends in place (no whole-cache copy per slot step).
    assert {type(layer).__name__ for layer in gen.past_key_values.layers} == {"_GrowingLayer"}
    j = hf.config.num_jacobi_iterations
    passes = model_step_flops(cfg, P, j, training=False) - P * out_layer  # growth, Jacobi and final passes
    assert counter.get_total_flops() == B * (passes + out_layer)


@pytest.mark.parametrize("n, thought_input", [(0, "hidden"), (1, "hidden"), (2, "hidden"), (1, "interpolated")])
def test_cached_token_costs_its_slot_steps_and_one_output_layer(n, thought_input):
    """Interpolated thoughts add one vocabulary mix per thought fed, none after the last slot."""
    cfg, hf = _hf(n, prefill="exact", thought_input=thought_input)
    ids = _prompt()
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
        cache = out.past_key_values if out.past_key_values is not None else out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        with FlopCounterMode(display=False) as counter:
            step = hf(input_ids=nxt, attention_mask=torch.ones(B, P + 1, dtype=torch.long), past_key_values=cache,
                      use_cache=True)
    assert step.logits.shape[1] == 1
    assert counter.get_total_flops() == B * model_decode_flops(cfg, P)


def test_growing_cache_layer_appends_in_place_and_reads_as_the_stock_one():
    """The exported model's cache layer (an append writes the new entries only) holds what the stock
    DynamicLayer's concatenation holds, through appends, a crop and a beam reorder."""
    from transformers.cache_utils import DynamicLayer

    from megatron_latent.hf.modeling_latent import _GrowingLayer

    ours, stock = _GrowingLayer(), DynamicLayer()
    g = torch.Generator().manual_seed(0)

    def append(n):
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        for layer in (ours, stock):
            got = layer.update(k, v)
        assert torch.equal(ours.keys, got[0]) and torch.equal(ours.keys, stock.keys)
        assert torch.equal(ours.values, stock.values) and ours.get_seq_length() == stock.get_seq_length()

    append(5)
    buffer = ours._buffers[0].data_ptr()
    for _ in range(12):  # single-slot steps fill the room left, not a new copy each
        append(1)
    assert ours._buffers[0].data_ptr() == buffer
    for layer in (ours, stock):
        layer.crop(-3)
    append(2)
    for layer in (ours, stock):
        layer.reorder_cache(torch.tensor([2, 0, 1]))
    append(1)
    for layer in (ours, stock):  # a batch subset that starts where the buffer does
        layer.keys, layer.values = layer.keys[:1], layer.values[:1]
    k, v = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    for layer in (ours, stock):
        layer.update(k, v)
    assert torch.equal(ours.keys, stock.keys) and torch.equal(ours.values, stock.values)
    for layer in (ours, stock):
        layer.keys, layer.values = layer.keys.expand(3, -1, -1, -1), layer.values.expand(3, -1, -1, -1)
    append(40)  # past the room: grows
    assert ours._buffers[0].data_ptr() != buffer


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
    # torch's counter knows the GPU fused attention kernels, not the CPU one megatron's path runs here.
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


@pytest.mark.parametrize("n", [1, 2])
def test_megatron_prefill_costs_the_forward_passes_and_no_logits(single_rank, n):
    """The KV decoder's Jacobi prefill runs the evaluation forward's passes (its final pass fills
    the cache) and no output layer; generate adds the output layer once per sample per token."""
    from megatron_latent.inference import LatentKVDecoder, PrefillParams, generate
    from tiny import ids as random_ids
    from tiny import inference_model, positions

    cfg, model = small_config("llama", n), inference_model("llama", n)
    out_layer = 2 * cfg.hidden_size * cfg.padded_vocab_size
    passes = model_step_flops(cfg, P, 2, training=False) - P * out_layer
    ids, valid = random_ids(B, P, seed=4), torch.ones(B, P, dtype=torch.bool)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        LatentKVDecoder(model, B, P).prefill(ids, positions(ids), valid, PrefillParams("jacobi", jacobi_iters=2))
    assert counter.get_total_flops() == B * passes
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        generate(model, ids, 1, prefill=PrefillParams("jacobi", jacobi_iters=2))
    assert counter.get_total_flops() == B * (passes + out_layer)


def test_megatron_cached_step_rotates_its_new_entries_only(single_rank, monkeypatch):
    """A cached step rotates its own query and key, not the cache (megatron-core's static path
    re-rotates every cached key at every step), and the cache is laid out head by head."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_latent.inference import LatentKVDecoder, PrefillParams
    from tiny import ids as random_ids
    from tiny import inference_model, positions

    model = inference_model("llama", 1)
    rotated = []
    apply = rope_utils._apply_rotary_pos_emb_bshd
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd",
                        lambda t, *a, **k: rotated.append(t.shape[0]) or apply(t, *a, **k))
    ids, valid = random_ids(B, P, seed=4), torch.ones(B, P, dtype=torch.bool)
    decoder = LatentKVDecoder(model, B, P + 1)
    with torch.no_grad():
        decoder.prefill(ids[:, :-1], positions(ids[:, :-1]), valid[:, :-1], PrefillParams("exact"))
        rotated.clear()
        decoder.step(ids[:, -1:], positions(ids)[:, -1:], valid[:, -1:])
    layers = model.config.num_layers
    assert rotated == [1] * (2 * layers * decoder.num_slots)  # query and key, per layer and slot step
    for keys, values in decoder.contexts[0].key_value_memory_dict.values():
        assert keys.stride(0) == keys.shape[-1] and values.stride(0) == values.shape[-1]
