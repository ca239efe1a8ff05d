"""Loss against the evaluation J (inference/jacobi_eval.py, benchmarks/eval_jacobi.py): enough Jacobi
passes give the exact sequential rollout's loss, J=0 does not, the loss is the training loss, and
the tool reads a checkpoint and a dataset to the library's numbers."""

import json
import math
import os
import subprocess
import sys

import numpy
import pytest
import torch

from tiny import VOCAB, inference_model, small_config

pytestmark = pytest.mark.usefixtures("single_rank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L = 6  # tokens per window: the Jacobi map is causal, L * N passes reach the exact thoughts


def _stream(length, seed=0):
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).numpy()


def test_windows_spread_over_the_stream():
    from megatron_latent.inference.jacobi_eval import spread_windows

    stream = numpy.arange(100)
    w = spread_windows(stream, 9, 4)
    assert w.shape == (4, 10) and w[0, 0] == 0 and w[-1, -1] == 99  # first and last tokens both used
    assert torch.equal(w[1], torch.arange(w[1, 0], w[1, 0] + 10))  # contiguous text
    with pytest.raises(ValueError, match="100 tokens hold fewer than 11 windows of 10 tokens"):
        spread_windows(stream, 9, 11)


def test_enough_passes_reach_the_rollout_and_j0_does_not():
    from megatron_latent.inference.jacobi_eval import ROLLOUT, bits_per_byte, jacobi_losses, spread_windows

    model = inference_model("gpt-neox", 1)
    windows = spread_windows(_stream(200), L, 5)
    got = jacobi_losses(model, windows, [0, 1, L], batch_size=2)  # batches of 2, 2 and 1 windows
    assert set(got) == {0, 1, L, ROLLOUT}
    assert abs(got[L] - got[ROLLOUT]) < 1e-5
    # At J=0 the thoughts are those of the growth pass alone: 3.1e-2 nats off with these weights.
    assert abs(got[0] - got[ROLLOUT]) > 1e-4
    # The mean of the model's own per-token training loss (labels given) at the same J.
    with torch.no_grad():
        own = model(windows[:, :-1], torch.arange(L).expand(5, L), None, labels=windows[:, 1:],
                    num_jacobi_iters=1).mean().item()
    assert abs(got[1] - own) < 1e-5
    assert bits_per_byte(got[0], 0.25) == pytest.approx(got[0] * 0.25 / math.log(2), rel=1e-12)
    assert bits_per_byte(got[0], None) is None


def test_scores_give_accuracy_passes_and_flops_of_each_setting():
    from megatron_latent.inference.jacobi_eval import ROLLOUT, jacobi_scores, spread_windows, tolerance_key
    from megatron_latent.inference.reference import sequential_logits
    from megatron_latent.models.flops import model_decode_flops, model_step_flops

    model = inference_model("llama", 1)
    cfg = small_config("llama", 1)
    windows = spread_windows(_stream(200, seed=1), L, 4)
    got = jacobi_scores(model, cfg, windows, [0, 2], tolerances=[1e-9, 10.0], batch_size=4)
    assert set(got) == {0, 2, tolerance_key(1e-9), tolerance_key(10.0), ROLLOUT}
    tokens, labels = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        exact = sequential_logits(model, tokens, torch.arange(L).expand(4, L))
    assert got[ROLLOUT]["accuracy"] == (exact.argmax(-1) == labels).double().mean().item()
    # A tolerance far below the changes runs Jacobi to the fixed point (at most L * N passes) ...
    tight = got[tolerance_key(1e-9)]
    assert abs(tight["loss"] - got[ROLLOUT]["loss"]) < 1e-5 and 1 <= tight["jacobi_passes"] <= L
    # ... one far above stops after the first pass.
    assert got[tolerance_key(10.0)]["jacobi_passes"] == 1
    assert got[2]["jacobi_passes"] == 2 and got[ROLLOUT]["jacobi_passes"] is None
    assert got[2]["flops_per_token"] == model_step_flops(cfg, L, 2, training=False) / L
    assert got[ROLLOUT]["flops_per_token"] == sum(model_decode_flops(cfg, p) for p in range(L)) / L


def test_tool_reads_a_checkpoint_to_the_library_numbers(tmp_path):
    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.data.indexed import CompactIndexedDatasetBuilder
    from megatron_latent.inference.jacobi_eval import jacobi_losses, spread_windows
    from megatron_latent.training.checkpointing import save_checkpoint

    model = inference_model("gpt-neox", 1)
    cfg = small_config("gpt-neox", 1, seq_length=L)
    root = str(tmp_path / "ckpt")
    save_checkpoint(root, 3, [model])
    write_model_config(cfg, root)
    docs = [_stream(n, seed=n).tolist() for n in (50, 31, 77)]
    prefix = str(tmp_path / "valid")
    builder = CompactIndexedDatasetBuilder(prefix + ".bin", numpy.uint16)
    builder.add_documents(docs, eod=0)
    builder.finalize(prefix + ".idx")
    stream = numpy.concatenate([d + [0] for d in docs])
    expected = jacobi_losses(model, spread_windows(stream, L, 7), [0, 2, L])

    out = tmp_path / "eval.json"
    cmd = [sys.executable, "benchmarks/eval_jacobi.py", "--load", root, "--data-path", prefix, "--jacobi", "0", "2",
           str(L), "--num-windows", "7", "--tokens-per-byte", "0.5", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["iteration"] == 3 and result["tokens"] == 7 * L
    for key, value in expected.items():
        assert result["loss"][str(key)] == pytest.approx(value, abs=1e-6), key
        assert result["bpb"][str(key)] == pytest.approx(value * 0.5 / math.log(2), abs=1e-6), key
    assert "exact rollout: loss" in proc.stdout

    bad = subprocess.run(cmd[:4] + ["--data-path", prefix + "_missing"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == f"error: --data-path: {prefix}_missing.bin does not exist"
