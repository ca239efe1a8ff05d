"""The latent forward under tensor parallelism, sequence parallelism and recomputation equals
its single-rank, plain self: loss and every gradient, in fp32."""

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


def _loss_and_grads(tp, variants):
    from megatron.core import parallel_state

    from megatron_latent.config import LatentSettings
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    out = {}
    for name in variants:
        overrides = dict(VARIANTS.get(name.replace("sp+", ""), {}))
        if name.startswith("sp+"):
            overrides["sequence_parallel"] = True
        m = tiny_gpt(tiny_config(tp, **overrides), latent=LatentSettings(N, scale_embeddings=True))
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
        out[name] = {"loss": loss.item(), "grads": gather_full(m, grads=True)}
    return out


@pytest.fixture(scope="module")
def single():
    return run_on_ranks(_loss_and_grads, 1, 1, list(VARIANTS))[0]


def test_recompute_equals_plain(single):
    ref = single["plain"]
    for name in ("recompute-full", "recompute-selective"):
        assert single[name]["loss"] == ref["loss"]
        assert max_rel_diff(single[name]["grads"], ref["grads"]) < 1e-6


def test_tensor_and_sequence_parallel_equal_single_rank(single):
    ref = single["plain"]
    results = run_on_ranks(_loss_and_grads, 2, 2, ["plain", "sp+plain", "sp+recompute-full"])
    for rank_out in results:
        for name, got in rank_out.items():
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
            assert max_rel_diff(got["grads"], ref["grads"]) < 1e-5, name
