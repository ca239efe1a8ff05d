"""Generation with the exported latent model: KV-cached decoding (N+1 cache entries per token)
equals decoding without a cache and megatron's exact sequential rollout; every prefill mode;
left-padded batches equal their rows run alone; sampling; bf16."""

import pytest
import torch

from tiny import VOCAB, latent_model, save, small_config

P, NEW = 6, 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_rank):
    """(megatron model, HF model) per (arch, N): LLaMA (GQA, RoPE) and GPT-2 (learned positions)."""
    import transformers

    from megatron_latent.hf.export import export_to_hf

    out = {}
    for arch, n in (("llama", 1), ("llama", 2), ("gpt2", 1)):
        cfg = small_config(arch, n)
        root = tmp_path_factory.mktemp(f"{arch}{n}")
        model = latent_model(cfg)
        save(model, cfg, str(root / "ckpt"))
        export_to_hf(str(root / "ckpt"), str(root / "hf"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True).eval()
        out[(arch, n)] = (model, hf)
    return out


def _prompt(batch=2, length=P, seed=11):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(hf, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                           max_new_tokens=NEW, pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)


CASES = [("llama", 1), ("llama", 2), ("gpt2", 1)]


@pytest.mark.parametrize("arch,n", CASES)
def test_cached_decoding_is_the_sequential_rollout(exported, arch, n):
    from megatron_latent.inference.reference import sequential_logits

    model, hf = exported[(arch, n)]
    ids = _prompt()
    cached = _generate(hf, ids, latent_prefill="exact")
    plain = _generate(hf, ids, latent_prefill="exact", use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert cached.sequences.shape == (2, P + NEW) and torch.equal(cached.sequences[:, :P], ids)
    step = torch.stack(cached.logits, 1)
    assert (step - torch.stack(plain.logits, 1)).abs().max() < 1e-5
    # N+1 cache entries per token fed (the last generated token is not fed).
    assert cached.cache.get_seq_length() == (n + 1) * (P + NEW - 1)
    # Every step's logits are megatron's exact rollout over the generated sequence.
    seq = cached.sequences
    ref = sequential_logits(model, seq, torch.arange(seq.shape[1]).expand_as(seq))[..., :VOCAB]
    assert (step - ref[:, P - 1 : -1]).abs().max() < 1e-5


@pytest.mark.parametrize("arch,n", CASES)
def test_prefill_modes(exported, arch, n):
    model, hf = exported[(arch, n)]
    ids = _prompt()
    exact = _generate(hf, ids, latent_prefill="exact")
    tol = _generate(hf, ids, latent_prefill="tolerance", jacobi_tolerance=1e-6)
    assert torch.equal(tol.sequences, exact.sequences)
    assert (torch.stack(tol.logits, 1) - torch.stack(exact.logits, 1)).abs().max() < 1e-5
    # Fixed-J prefill: the first step is megatron's Jacobi forward (J=3) at the last prompt position.
    jac = _generate(hf, ids, latent_prefill="jacobi")
    with torch.no_grad():
        ref = model(ids, torch.arange(P).expand_as(ids), None)[:, -1, :VOCAB]
    assert (jac.logits[0] - ref).abs().max() < 1e-5
    with torch.no_grad():
        info = hf(ids, latent_prefill="tolerance", jacobi_tolerance=1e-6)
    print(f"\n{arch} N={n}: tolerance 1e-6 prefill of {P} tokens took {info.jacobi_iterations} Jacobi iterations")
    assert 1 <= info.jacobi_iterations <= n * P


@pytest.mark.parametrize("arch,n", CASES)
@pytest.mark.parametrize("prefill", ["exact", "jacobi"])
def test_left_padded_batch_equals_rows_alone(exported, arch, n, prefill):
    _, hf = exported[(arch, n)]
    a, b = _prompt(1, P, seed=1), _prompt(1, P - 3, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batched = _generate(hf, ids, mask, latent_prefill=prefill)
    for row, alone in ((0, a), (1, b)):
        single = _generate(hf, alone, latent_prefill=prefill)
        assert torch.equal(batched.sequences[row, -NEW:], single.sequences[0, -NEW:])
        got = torch.stack([step[row] for step in batched.logits])
        assert (got - torch.stack([step[0] for step in single.logits])).abs().max() < 1e-5


def test_sampling(exported):
    _, hf = exported[("llama", 1)]
    ids = _prompt()
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, latent_prefill="exact")
    torch.manual_seed(3)
    cached = _generate(hf, ids, **kw).sequences
    torch.manual_seed(3)
    plain = _generate(hf, ids, use_cache=False, **kw).sequences
    assert torch.equal(cached, plain)  # uncached steps recompute the same logits
    draws = set()
    for seed in range(4):
        torch.manual_seed(seed)
        draws.add(tuple(_generate(hf, ids, **kw).sequences[0, P:].tolist()))
    assert len(draws) > 1  # it samples
    # eos stops a row and pads it afterwards.
    greedy = _generate(hf, ids).sequences
    eos = int(greedy[1, P + 1])
    out = _generate(hf, ids, eos_token_id=eos).sequences
    assert out.shape[1] == P + NEW and torch.equal(out[1, : P + 2], greedy[1, : P + 2])
    assert (out[1, P + 2 :] == 0).all()  # padded after eos


def test_bf16(exported):
    _, hf = exported[("llama", 1)]
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    low = type(hf).from_pretrained(hf.name_or_path, dtype=torch.bfloat16).eval()
    assert next(low.parameters()).dtype == torch.bfloat16
    for prefill in ("exact", "jacobi", "tolerance"):
        # Each prefill against its own fp32 run: the Jacobi prefills are not the exact one.
        ref = _generate(hf, ids, mask, latent_prefill=prefill, jacobi_tolerance=1e-2)
        out = _generate(low, ids, mask, latent_prefill=prefill, jacobi_tolerance=1e-2)
        assert out.sequences.shape == ref.sequences.shape
        first = out.logits[0]
        rel = (first - ref.logits[0]).abs().max() / ref.logits[0].abs().max()
        assert rel < 0.05, (prefill, rel)
