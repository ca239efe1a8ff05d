"""Activation memory of --jacobi-grad-passes and of recompute, measured as benchmarks/bench_grad_passes.py
does: the peak of what autograd saves, over the forward and the backward (benchmarks/activation_memory.py).
Passes without a graph keep nothing; megatron's full recompute keeps each unit's input (a pass, or a
layer of a pass) and rebuilds one unit's activations at a time in backward."""

import os
import sys

import pytest

from megatron_latent.config import LatentSettings
from parallel_utils import LAYERS, batch, init_weights, tiny_config, tiny_gpt

# A measuring tool of benchmarks/bench_*.py, not part of the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from activation_memory import SavedActivationMeter  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_rank")


def _peak(n, j, k=None, recompute_layers=None):
    overrides = {}
    if recompute_layers:
        overrides = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=recompute_layers)
    settings = LatentSettings(num_latent_thoughts=n, scale_embeddings=True, grad_passes=k)
    m = tiny_gpt(tiny_config(**overrides), latent=settings)
    init_weights([m])
    m.train()
    d = batch(3, 2, 16)
    with SavedActivationMeter(m.parameters()) as meter:
        m(d["tokens"], d["position_ids"], None, labels=d["labels"], num_jacobi_iters=j).mean().backward()
    assert meter.current_bytes == 0  # the backward released everything that was saved
    return meter.peak_bytes


@pytest.mark.parametrize("n", [1, 2])
def test_passes_without_a_graph_keep_nothing(n):
    # With K passes backpropagated, one more Jacobi iteration adds a pass without a graph: not a byte.
    for k in (1, 2):
        assert _peak(n, 3, k) == _peak(n, 2, k), k
    full2, full3 = _peak(n, 2), _peak(n, 3)
    one, two = _peak(n, 3, 1), _peak(n, 3, 2)
    assert full3 > full2  # full backprop keeps every pass
    # Each pass with a graph keeps the same activations (the passes are the same computation).
    assert two - one == pytest.approx(full3 - full2, rel=0.02)
    assert one < two < full3


def test_recompute_keeps_unit_inputs_and_rebuilds_one_unit_in_backward():
    n, passes = 1, 5  # N + J + 1 at J=3
    plain = {j: _peak(n, j) for j in (2, 3)}
    per_pass = {j: _peak(n, j, recompute_layers=LAYERS) for j in (2, 3)}
    per_layer = {j: _peak(n, j, recompute_layers=1) for j in (2, 3)}
    one_pass = plain[3] - plain[2]
    # What a pass adds under recompute is its stored inputs: one per pass, or one per layer of it.
    pass_inputs, layer_inputs = per_pass[3] - per_pass[2], per_layer[3] - per_layer[2]
    assert 0 < pass_inputs < layer_inputs < 0.1 * one_pass * LAYERS
    assert pass_inputs < 0.1 * one_pass
    # The rest of the peak is the unit rebuilt in backward, one at a time. (A meter closed before
    # backward would miss it and read only the stored inputs.)
    rebuilt_pass = per_pass[3] - passes * pass_inputs
    rebuilt_layer = per_layer[3] - passes * layer_inputs
    assert 0.8 * one_pass < rebuilt_pass < 1.2 * one_pass
    assert 0 < rebuilt_layer < 0.5 * one_pass
