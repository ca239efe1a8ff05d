"""KV-cached latent generation (TP=1, in process) against the exact sequential reference, the
training forward's Jacobi solution and the plain GPTModel; padding, sampling, EOD, bad input."""

import pytest
import torch

from megatron_latent.inference import PrefillParams, SamplingParams, decode_logits, generate
from megatron_latent.inference.reference import sequential_logits
from megatron_latent.inference.sampling import sample
from tiny import ARCHS, inference_model, positions
from tiny import ids as random_ids

pytestmark = pytest.mark.usefixtures("single_rank")
L = 6
EXACT = PrefillParams("exact")  # the default is Jacobi at the model's J, exact only on trained models


@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_equals_sequential_reference(arch, n):
    m = inference_model(arch, n)
    ids = random_ids(2, L, seed=n)
    ref = sequential_logits(m, ids, positions(ids))
    # Prompt of 3 positions by the exact (slot by slot) prefill, then 3 cached token steps.
    got = decode_logits(m, ids, decode_steps=3, prefill=EXACT)
    assert got.prefill_iters is None
    torch.testing.assert_close(got.logits, ref, rtol=1e-5, atol=1e-5)
    # The whole sequence as one prefill, too.
    torch.testing.assert_close(decode_logits(m, ids, decode_steps=0, prefill=EXACT).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt-neox", "llama"])
def test_rotary_by_cache_index_would_be_wrong(arch, monkeypatch):
    """Negative control: the comparison above sees where rotary is indexed (thoughts share the
    position id of their token; indexing rotary by cache entry gives other logits)."""
    m = inference_model(arch, 1)
    ids = random_ids(2, L, seed=3)
    ref = sequential_logits(m, ids, positions(ids))
    original = m.rotary_for
    monkeypatch.setattr(m, "rotary_for", lambda pos, k: original(torch.arange(pos.shape[1]).expand_as(pos), k))
    assert (decode_logits(m, ids, prefill=EXACT).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_n0_greedy_equals_plain_gpt_greedy_without_cache(arch):
    from megatron_latent.models.gpt import build_gpt_model
    from tiny import small_config

    latent = inference_model(arch, 0)
    plain = build_gpt_model(small_config(arch, 0), use_te=False).eval()
    plain.load_state_dict(latent.state_dict())
    prompt, steps = random_ids(2, 4, seed=5), 6
    ids, ref_logits = prompt, []
    with torch.no_grad():
        for _ in range(steps):  # the whole sequence again at every step, no cache
            logits = plain(ids, positions(ids), None)[:, -1]
            ref_logits.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    out = generate(latent, prompt, steps, return_logits=True)
    assert out.ids == ids[:, 4:].tolist()
    assert out.prompt_ids == prompt.tolist()
    torch.testing.assert_close(out.logits, torch.stack(ref_logits, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_jacobi_prefill_is_the_parallel_forward(arch, n):
    m = inference_model(arch, n)
    ids = random_ids(2, L, seed=7)
    for j in (0, 1, 2):
        got = decode_logits(m, ids, decode_steps=0, prefill=PrefillParams("jacobi", jacobi_iters=j))
        with torch.no_grad():
            forward = m(ids, positions(ids), None, num_jacobi_iters=j)
        assert got.prefill_iters == j
        torch.testing.assert_close(got.logits, forward, rtol=1e-5, atol=1e-5)
    exact = sequential_logits(m, ids, positions(ids))
    # Few iterations are not the fixed point: the prefill really used the Jacobi thoughts.
    assert (decode_logits(m, ids, decode_steps=0, prefill=PrefillParams("jacobi", 0)).logits - exact).abs().max() > 1e-4
    # Default J: the model's jacobi_iters_eval.
    default = decode_logits(m, ids, decode_steps=0, prefill=PrefillParams("jacobi"))
    assert default.prefill_iters == m.latent.jacobi_iters_eval


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobi_tolerance_prefill_reaches_exact_prefill(arch):
    n = 2
    m = inference_model(arch, n)
    ids = random_ids(2, L, seed=11)
    exact = sequential_logits(m, ids, positions(ids))
    strict = decode_logits(m, ids, decode_steps=2, prefill=PrefillParams("tolerance", tol=1e-6))
    loose = decode_logits(m, ids, decode_steps=2, prefill=PrefillParams("tolerance", tol=1e-1))
    print(f"\n{arch} N={n} P={L - 2}: Jacobi passes to tol 1e-6: {strict.prefill_iters}, "
          f"to 1e-1: {loose.prefill_iters}")
    assert 1 <= loose.prefill_iters < strict.prefill_iters <= (L - 2) * n
    torch.testing.assert_close(strict.logits, exact, rtol=1e-5, atol=1e-5)
    assert (loose.logits - exact).abs().max() > 1e-6
    # The reported count is what was run: the fixed-J prefill with that J gives the same numbers.
    for tol_run, tol in ((strict, 1e-6), (loose, 1e-1)):
        fixed = decode_logits(m, ids, decode_steps=2, prefill=PrefillParams("jacobi", tol_run.prefill_iters))
        assert torch.equal(fixed.logits, tol_run.logits), tol
    # The iteration cap is honoured.
    capped = PrefillParams("tolerance", tol=1e-9, max_jacobi_iters=1)
    assert decode_logits(m, ids, prefill=capped).prefill_iters == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_each_sample_alone(arch):
    m = inference_model(arch, 1)
    prompts = [random_ids(1, k, seed=20 + k)[0].tolist() for k in (5, 2, 4)]
    batch = generate(m, prompts, 4, return_logits=True)
    assert batch.prompt_ids == prompts
    for i, p in enumerate(prompts):
        alone = generate(m, [p], 4, return_logits=True)
        assert batch.ids[i] == alone.ids[0]
        torch.testing.assert_close(batch.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)
    # Teacher-forced through the padded cache: each row's real positions equal its own reference,
    # for the exact and the Jacobi-to-tolerance prefill.
    for prefill in (PrefillParams("exact"), PrefillParams("tolerance", tol=1e-7)):
        got = decode_logits(m, prompts, decode_steps=1, prefill=prefill)
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            ref = sequential_logits(m, ids, positions(ids))[0]
            assert got.valid[i].sum() == len(p)
            torch.testing.assert_close(got.logits[i][got.valid[i]], ref, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    m = inference_model("llama", 1)
    prompts = random_ids(2, 3, seed=30)
    greedy = generate(m, prompts, 6)

    def sampled(seed, **kw):
        params = dict(greedy=False, temperature=2.0, top_p=0.99, seed=seed) | kw
        return generate(m, prompts, 6, sampling=SamplingParams(**params)).ids

    a = sampled(1)
    assert sampled(1) == a
    assert sampled(2) != a
    assert a != greedy.ids
    assert sampled(3, temperature=3.0, top_k=1, top_p=1.0) == greedy.ids


def test_sampling_distribution_matches_temperature_top_k_top_p():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -1.0, 0.9, 5.0])  # id 6: a padded vocabulary row
    t, k, p = 0.7, 4, 0.8
    probs = torch.softmax(logits[:6] / t, -1)
    keep = probs.argsort(descending=True)[:k]
    kept = probs[keep] / probs[keep].sum()
    ranked_mass_before = kept.cumsum(0) - kept
    keep, kept = keep[ranked_mass_before < p], kept[ranked_mass_before < p]
    expected = torch.zeros(7)
    expected[keep] = kept / kept.sum()
    params = SamplingParams(greedy=False, temperature=t, top_k=k, top_p=p, vocab_size=6)
    draws = sample(logits.expand(40000, 7), params, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=7).float() / draws.numel()
    assert 2 <= len(keep) < k  # both filters are active in this example
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    # Greedy never picks a padded row either.
    assert sample(logits[None], SamplingParams(vocab_size=6)).item() == 0


def test_stop_at_eod():
    m = inference_model("gpt2", 1)
    prompt = random_ids(1, 3, seed=40)[0].tolist()
    free = generate(m, [prompt], 5).ids[0]
    eod = free[2]
    first = free.index(eod)
    out = generate(m, [prompt, [7, 8]], 5, eod_id=eod)
    assert out.ids[0] == free[: first + 1]
    alone = generate(m, [[7, 8]], 5, eod_id=eod)
    assert out.ids[1] == alone.ids[0]
    # One sample: decoding stops at EOD (fewer logits than max_new_tokens).
    single = generate(m, [prompt], 5, eod_id=eod, return_logits=True)
    assert single.ids[0] == free[: first + 1] and single.logits.shape[1] == first + 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=[[]]), "at least one token"),
        (dict(prompt_ids=[]), "at least one token"),
        (dict(prompt_ids=[[1, 999]]), "token id 999 is outside"),
        (dict(prompt_ids=[[1, -1]]), "token id -1 is outside"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(max_new_tokens=100), "learned positions"),
        (dict(prompt_ids=torch.ones(3)), r"\[batch, length\]"),
    ],
)
def test_bad_input_errors_clearly(kwargs, message):
    m = inference_model("gpt2", 1)  # seq_length 32 learned positions
    args = dict(prompt_ids=[[1, 2, 3]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(m, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (PrefillParams, dict(mode="beam"), "prefill mode 'beam': choose one of exact, jacobi, tolerance"),
        (PrefillParams, dict(mode="tolerance"), "mode 'tolerance' needs tol > 0, got None"),
        (PrefillParams, dict(mode="tolerance", tol=0.0), "mode 'tolerance' needs tol > 0, got 0.0"),
        (PrefillParams, dict(mode="exact", tol=1e-3), "tol 0.001 needs mode 'tolerance' \\(mode is 'exact'\\)"),
        (PrefillParams, dict(mode="exact", jacobi_iters=2), "jacobi_iters 2: needs mode 'jacobi'"),
        (PrefillParams, dict(mode="jacobi", jacobi_iters=-1), "jacobi_iters -1: needs mode 'jacobi' and a value >= 0"),
        (PrefillParams, dict(mode="jacobi", max_jacobi_iters=4), "max_jacobi_iters 4: needs mode 'tolerance'"),
        (PrefillParams, dict(mode="tolerance", tol=1.0, max_jacobi_iters=0), "a value >= 1"),
        (SamplingParams, dict(greedy=False, temperature=0.0), "temperature must be > 0"),
        (SamplingParams, dict(greedy=False, top_p=0.0), "top_p must be in"),
        (SamplingParams, dict(greedy=False, top_k=-2), "top_k must be an integer"),
    ],
)
def test_bad_parameters_error_clearly(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_parameter_groups_are_taken_whole():
    m = inference_model("llama", 1)
    with pytest.raises(TypeError, match="prefill must be a PrefillParams, got str 'jacobi'"):
        generate(m, [[1]], 1, prefill="jacobi")
    with pytest.raises(TypeError, match="sampling must be a SamplingParams, got dict"):
        generate(m, [[1]], 1, sampling=dict(greedy=False))
    with pytest.raises(TypeError, match="prefill must be a PrefillParams"):
        decode_logits(m, [[1, 2]], prefill="tolerance")


def test_bad_model_errors_clearly():
    from megatron_latent.models.gpt import build_gpt_model
    from tiny import small_config

    with pytest.raises(TypeError, match="LatentGPTModel"):
        generate(build_gpt_model(small_config("llama", 0), use_te=False).eval(), [[1]], 1)
    m = inference_model("llama", 1).train()
    with pytest.raises(ValueError, match="eval"):
        generate(m, [[1]], 1)
