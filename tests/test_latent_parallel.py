"""The latent forward and its baselines (interpolated thoughts, pause tokens, extra loops, pondering), and the
latent forward backpropagated through its last two passes only (--jacobi-grad-passes 2), under
tensor parallelism, sequence parallelism and recomputation equal their single-rank, plain selves:
loss and every gradient, in fp32."""

import pytest
import torch

from multirank import run_on_ranks
from parallel_utils import batch, gather_full, init_weights, max_rel_diff, tiny_config, tiny_gpt

L, N, J = 8, 1, 2
VARIANTS = {
    "plain": {},
    "recompute-full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "recompute-selective": dict(recompute_granularity="selective"),
}
# LatentSettings keyword arguments of each method (K = 2 pause tokens / extra loops / pondering steps).
METHODS = {
    "latent": dict(num_latent_thoughts=N),
    "interpolated": dict(num_latent_thoughts=N, thought_input="interpolated"),
    "pause": dict(num_pause_tokens=2),
    "loop": dict(num_extra_loops=2),
    "ponder": dict(num_ponder_steps=2, ponder_feedback="interpolated"),
    "ponder-hidden": dict(num_ponder_steps=2, ponder_feedback="hidden"),
    # Not a method: the latent forward with a graph for its last 2 of N + J + 1 = 4 passes only.
    "latent-k2": dict(num_latent_thoughts=N, grad_passes=2),
}


def _loss_and_grads(tp, runs):
    """`runs`: [(method, variant)], variant a VARIANTS name, optionally prefixed "sp+"."""
    from megatron.core import parallel_state

    from megatron_latent.config import LatentSettings
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    out = {}
    for method, name in runs:
        overrides = dict(VARIANTS.get(name.replace("sp+", ""), {}))
        if name.startswith("sp+"):
            overrides["sequence_parallel"] = True
        m = tiny_gpt(tiny_config(tp, **overrides), latent=LatentSettings(**METHODS[method], scale_embeddings=True))
        init_weights([m])
        m.train()
        d = batch(11, 2, L)
        loss = m(d["tokens"], d["position_ids"], None, labels=d["labels"], num_jacobi_iters=J).mean()
        loss.backward()
        if m.config.sequence_parallel:
            # What megatron's finalize_model_grads does for sequence-parallel parameters (norms):
            # each rank saw part of the sequence, so their gradients are summed over TP.
            for p in m.parameters():
                if getattr(p, "sequence_parallel", False):
                    torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
        out[method, name] = {"loss": loss.item(), "grads": gather_full(m, grads=True)}
    return out


@pytest.fixture(scope="module")
def single():
    runs = [("latent", v) for v in VARIANTS] + [(m, v) for m in METHODS if m != "latent"
                                                  for v in ("plain", "recompute-full")]
    return run_on_ranks(_loss_and_grads, 1, 1, runs)[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_recompute_equals_plain(single, method):
    ref = single[method, "plain"]
    for (m, name), got in single.items():
        if m == method and name != "plain":
            assert got["loss"] == ref["loss"], name
            assert max_rel_diff(got["grads"], ref["grads"]) < 1e-6, name


def test_methods_differ(single):
    # Each method computes something else from the same weights (a test that cannot tell them
    # apart would pass with the wrong wiring).
    losses = [single[m, "plain"]["loss"] for m in METHODS if m != "latent-k2"]
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-4, losses
    # Fewer passes backpropagated: the same forward, other gradients.
    full, k2 = single["latent", "plain"], single["latent-k2", "plain"]
    assert k2["loss"] == full["loss"]
    assert max_rel_diff(k2["grads"], full["grads"]) > 1e-3


def test_tensor_and_sequence_parallel_equal_single_rank(single):
    runs = [(m, v) for m in METHODS for v in ("plain", "sp+plain", "sp+recompute-full")]
    results = run_on_ranks(_loss_and_grads, 2, 2, runs)
    for rank_out in results:
        assert set(rank_out) == set(runs)
        for (method, name), got in rank_out.items():
            ref = single[method, "plain"]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), (method, name)
            assert max_rel_diff(got["grads"], ref["grads"]) < 1e-5, (method, name)
