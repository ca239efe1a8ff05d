"""The training entry point: a latent model trains at TP=2 (loss goes down); bad flags stop it."""

import pytest

from megatron_latent.training.arguments import parse_args
from multirank import run_on_ranks

ARGS = ["--mock-data", "--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32",
        "--seq-length", "16", "--num-latent-thoughts", "1", "--scale-embeddings", "--train-iters", "8",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-fraction", "0"]


def _main(argv):
    import contextlib
    import io

    from megatron_latent import pretrain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pretrain.main(argv)
    return code, out.getvalue()


def test_latent_training_at_tp2_lowers_the_loss():
    results = run_on_ranks(_main, 2, ARGS)
    assert [code for code, _ in results] == [0, 0]
    lines = [l for l in results[0][1].splitlines() if l.startswith("iteration")]
    assert len(lines) == 8 and " J " in lines[0]
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines]
    assert losses[-1] < losses[0] - 0.3


def test_latent_with_pipeline_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--num-latent-thoughts", "1", "--pipeline-model-parallel-size", "2"])
    assert "--pipeline-model-parallel-size" in capsys.readouterr().err


def test_inverted_jacobi_range_is_one_clear_error(capsys):
    from megatron_latent import pretrain

    assert pretrain.main(["--mock-data", "--num-latent-thoughts", "1", "--jacobi-iters", "3", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --jacobi-iters 3 2: need an inclusive range 0 <= min <= max"]
