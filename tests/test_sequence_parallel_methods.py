"""Every method (vanilla, latent thoughts, interpolated thoughts, pause tokens, extra loops) trains
through the driver at TP=2 with sequence parallelism and gives the single-rank run's losses and
gradient norms (a rotary model: megatron reduce-scatters its embeddings under sequence parallelism)."""

import pytest

from multirank import run_on_ranks
from test_pretrain import TINY, _losses, _runs, _tb

METHODS = {
    "vanilla": [],
    "latent": ["--num-latent-thoughts", "1", "--jacobi-iters", "1", "2"],
    "interpolated": ["--num-latent-thoughts", "1", "--thought-input", "interpolated", "--jacobi-iters", "1", "2"],
    "pause": ["--num-pause-tokens", "2"],
    "loop": ["--num-extra-loops", "1"],
}
COMMON = TINY + ["--mock-data", "--seq-length", "16", "--train-iters", "2", "--micro-batch-size", "2",
                 "--global-batch-size", "4", "--lr", "1e-2"]
SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    one = [COMMON + flags + _tb(tmp, f"{m}-1") for m, flags in METHODS.items()]
    two = [COMMON + flags + SP + _tb(tmp, f"{m}-sp") for m, flags in METHODS.items()]
    results = {"1": run_on_ranks(_runs, 1, one)[0], "sp": run_on_ranks(_runs, 2, two, timeout=600)[0]}
    return tmp, results


@pytest.mark.parametrize("method", list(METHODS))
def test_tp2_sequence_parallel_equals_one_rank(runs, method):
    tmp, results = runs
    i = list(METHODS).index(method)
    for layout in ("1", "sp"):
        code, out, err = results[layout][i]
        assert code == 0, (layout, err[-2000:])
    assert "TP=2" in results["sp"][i][1] and f"method {method}" in results["sp"][i][1]
    for key in ("train/loss", "train/grad_norm"):
        ref, got = _losses(tmp, f"{method}-1", key), _losses(tmp, f"{method}-sp", key)
        assert sorted(ref) == sorted(got) == [1, 2]
        for step in (1, 2):
            assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (key, step)
