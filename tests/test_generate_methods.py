"""The baselines (interpolated thoughts, pause tokens, extra loops, pondering) at TP=1, in process: the training
forward reaches the exact sequential reference, KV-cached decoding equals it, and greedy generation
with the cache equals greedy generation by the reference (no cache)."""

import pytest
import torch

from megatron_latent.inference import PrefillParams, SamplingParams, decode_logits, generate
from megatron_latent.inference.reference import sequential_logits
from tiny import ARCHS, inference_model, positions
from tiny import ids as random_ids

pytestmark = pytest.mark.usefixtures("single_rank")
L = 5

# (N, overrides) per method; scale_embeddings on as the methods' defaults are.
METHODS = {
    "interpolated": (1, dict(thought_input="interpolated", scale_embeddings=True)),
    "interpolated-top5": (2, dict(thought_input="interpolated", interpolation_topk=5, scale_embeddings=True)),
    "pause": (0, dict(num_pause_tokens=2, scale_embeddings=True)),
    "loop": (0, dict(num_extra_loops=2, scale_embeddings=True)),
    # Pondering: the family's feedback (hidden for GPT-NeoX), and the residual mix.
    "ponder": (0, dict(num_ponder_steps=2)),
    "ponder-residual": (0, dict(num_ponder_steps=2, ponder_feedback="interpolated", ponder_residual=True)),
}


def _model(arch, method):
    n, kw = METHODS[method]
    return inference_model(arch, n, **kw)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_cache_equal_the_sequential_reference(arch, method):
    m = _model(arch, method)
    assert m.latent.method == method.split("-")[0]
    ids = random_ids(2, L, seed=3)
    ref = sequential_logits(m, ids, positions(ids))
    n = m.latent.num_latent_thoughts
    with torch.no_grad():  # the causal Jacobi map reaches its fixed point within L * N passes
        forward = m(ids, positions(ids), None, num_jacobi_iters=L * n)
    torch.testing.assert_close(forward, ref, rtol=1e-5, atol=1e-5)
    # Cached: a prompt of 2 positions by the exact prefill, then 3 cached token steps; the whole
    # sequence as one prefill (pause, loop, ponder: one pass per cache; interpolated: Jacobi to tolerance).
    torch.testing.assert_close(decode_logits(m, ids, decode_steps=3).logits, ref, rtol=1e-5, atol=1e-5)
    solved = PrefillParams("tolerance", tol=1e-7) if n else PrefillParams()
    whole = decode_logits(m, ids, decode_steps=0, prefill=solved)
    torch.testing.assert_close(whole.logits, ref, rtol=1e-5, atol=1e-5)
    if n:
        # Few Jacobi passes are not the fixed point: the prefill really solved the thoughts.
        few = decode_logits(m, ids, decode_steps=0, prefill=PrefillParams("jacobi", jacobi_iters=0)).logits
        assert (few - ref).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["interpolated", "pause", "loop", "ponder"])
def test_greedy_generation_equals_the_reference(method):
    m = _model("llama", method)
    prompt, steps = [random_ids(1, k, seed=9 + k)[0].tolist() for k in (4, 2)], 4
    out = generate(m, prompt, steps, sampling=SamplingParams(vocab_size=m.token_vocab_size), return_logits=True)
    for i, p in enumerate(prompt):
        seq = torch.tensor([p])
        for k in range(steps):  # the whole sequence again at every step, no cache
            logits = sequential_logits(m, seq, positions(seq))[0, -1]
            torch.testing.assert_close(out.logits[i, k], logits.float(), rtol=1e-5, atol=1e-5)
            seq = torch.cat([seq, logits[: m.token_vocab_size].argmax()[None, None]], dim=1)
        assert out.ids[i] == seq[0, len(p):].tolist()


def test_the_methods_change_the_logits():
    """Negative controls: the same weights as a vanilla model give other logits, so the comparisons
    above see the pauses, the loops and the interpolated inputs."""
    ids = random_ids(2, L, seed=4)
    vanilla = sequential_logits(inference_model("llama", 0, scale_embeddings=True), ids, positions(ids))
    latent = sequential_logits(inference_model("llama", 1, scale_embeddings=True), ids, positions(ids))
    for method in ("pause", "loop", "ponder", "ponder-residual"):
        got = sequential_logits(_model("llama", method), ids, positions(ids))[..., :vanilla.shape[-1]]
        assert (got - vanilla).abs().max() > 1e-3, method
    interp = sequential_logits(_model("llama", "interpolated"), ids, positions(ids))
    assert (interp - latent).abs().max() > 1e-3
