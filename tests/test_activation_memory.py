"""SavedActivationMeter counts the bytes autograd saves for backward, live and peak."""

import os
import sys

import torch

# A measuring tool of benchmarks/bench_pipeline.py, not part of the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from activation_memory import SavedActivationMeter  # noqa: E402


def test_counts_saved_activations_until_backward_frees_them():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    with SavedActivationMeter(lin.parameters()) as meter:
        y1 = torch.relu(lin(x))  # saves x (matmul) and the relu output; the weight is excluded
        one = meter.current_bytes
        assert one == 2 * 8 * 16 * 4
        y2 = torch.relu(lin(x))  # x is shared: only the second relu output is new
        assert meter.current_bytes == one + 8 * 16 * 4
        y1.sum().backward()
        del y1
        assert meter.current_bytes == 2 * 8 * 16 * 4  # x still saved by y2's graph, plus its relu output
        y2.sum().backward()
        del y2
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 3 * 8 * 16 * 4
