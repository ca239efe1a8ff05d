"""The training driver end to end: it trains (loss falls), starts the same model at every parallel
layout, resumes exactly where it stopped, reads real indexed data with document resets, continues
pretraining from a converted HF checkpoint, and stops on bad flags with one line naming the flag."""

import contextlib
import io
import json
import os

import pytest
import torch

from multirank import run_on_ranks

TINY = ["--model-preset", "tiny-llama", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-workers", "0", "--lr-warmup-fraction", "0", "--eval-iters", "0"]
LATENT = ["--num-latent-thoughts", "1", "--scale-embeddings"]


def _main(argv):
    from megatron_latent import pretrain

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pretrain.main(argv)
    return code, out.getvalue(), err.getvalue()


def _runs(argvs):
    """Several driver runs, one after another, in the same spawned world."""
    return [_main(a) for a in argvs]


def _tb(tmp_path, name):
    return ["--tensorboard-dir", str(tmp_path / name)]


def _losses(tmp_path, name, key="train/loss"):
    """{iteration: value} of `key` in the metrics.jsonl that run `name` wrote (its --tensorboard-dir)."""
    with open(tmp_path / name / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["iteration"]: r[key] for r in records if key in r}


def test_latent_training_at_tp2_lowers_the_loss(tmp_path):
    argv = TINY + LATENT + _tb(tmp_path, "tb") + [
        "--mock-data", "--tensor-model-parallel-size", "2", "--seq-length", "16", "--train-iters", "8",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2"]
    results = run_on_ranks(_main, 2, argv)
    assert [r[0] for r in results] == [0, 0]
    losses = _losses(tmp_path, "tb")
    assert sorted(losses) == list(range(1, 9)) and " J " in results[0][1]
    assert losses[8] < losses[1] - 0.3


def test_jacobi_grad_passes_trains_through_the_driver(tmp_path):
    # The same first forward as full backprop (same init, data and J), then other gradients.
    common = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--train-iters", "3", "--micro-batch-size", "2",
                              "--global-batch-size", "2", "--lr", "1e-2", "--jacobi-iters", "2", "2"]
    (full, k1), = run_on_ranks(_runs, 1, [common + _tb(tmp_path, "full"),
                                         common + _tb(tmp_path, "k1") + ["--jacobi-grad-passes", "1"]])
    assert full[0] == 0 and k1[0] == 0, k1[2]
    a, b = _losses(tmp_path, "full"), _losses(tmp_path, "k1")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert a[1] == b[1]
    assert abs(a[3] - b[3]) > 1e-4
    assert b[3] < b[1] - 0.1  # and it trains
    # The logged model FLOP/s count the passes backpropagated: per step, what models/flops.py says.
    from megatron_latent.models.flops import model_step_flops
    from megatron_latent.training.arguments import model_config_from_args, parse_args

    per_step = {}
    for name, extra in (("full", []), ("k1", ["--jacobi-grad-passes", "1"])):
        cfg = model_config_from_args(parse_args(common + extra), None)
        per_step[name] = model_step_flops(cfg, 16, 2) * 2  # seq 16, J=2, global batch 2
        tflops = _losses(tmp_path, name, "train/tflops_per_device")
        seconds = _losses(tmp_path, name, "train/step_time_s")
        for step in (1, 2, 3):
            assert tflops[step] * 1e12 * seconds[step] == pytest.approx(per_step[name], rel=1e-9), (name, step)
    assert per_step["k1"] < 0.7 * per_step["full"]


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"]],
                         ids=["adam", "distributed"])
def test_resume_continues_exactly(tmp_path, optimizer):
    """Stopping at 3 and resuming gives the uninterrupted run's steps 4-6: weights, optimizer
    (sharded over DP with the distributed optimizer; --decoupled-lr's own parameter group among
    its groups), scheduler, data position and the per-step Jacobi draw all come back (DP=2)."""
    save = str(tmp_path / "ckpt")
    common = TINY + LATENT + optimizer + [
        "--mock-data", "--seq-length", "16", "--train-iters", "6", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "1e-2", "--jacobi-iters", "1", "3", "--decoupled-lr", "2e-2"]
    runs = run_on_ranks(_runs, 2, [
        common + _tb(tmp_path, "a"),
        common + _tb(tmp_path, "b") + ["--save", save, "--exit-interval", "3"],
        common + _tb(tmp_path, "c") + ["--load", save, "--save", save],
    ], timeout=600)
    (code_a, out_a, _), (code_b, out_b, _), (code_c, out_c, _) = runs[0]
    assert (code_a, code_b, code_c) == (0, 0, 0)
    full, first, rest = (_losses(tmp_path, run) for run in "abc")
    assert sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5, 6]
    assert "resumed from" in out_c
    for step in range(1, 7):
        got = first.get(step, rest.get(step))
        assert got == full[step], (step, got, full[step])
    js = [line.split(" J ")[1].split()[0] for line in out_a.splitlines() if line.startswith("iteration")]
    assert len(set(js)) > 1  # J really varies per step
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "6"
    assert json.load(open(os.path.join(save, "model_config.json")))["latent"]["num_latent_thoughts"] == 1
    if optimizer:  # its state is read back only with the distributed optimizer and the same TP/PP
        (code, _, err), = run_on_ranks(_runs, 2, [[a for a in common if a != "--use-distributed-optimizer"]
                                                  + ["--load", save, "--train-iters", "7"]])[0]
        assert code == 2 and "was saved with --use-distributed-optimizer" in err and "--no-load-optim" in err


def _corpus(tmp_path):
    from data_fixtures import make_texts, train_hf_bpe, write_jsonl
    from megatron_latent.data.preprocess import PreprocessConfig, preprocess
    from megatron_latent.data.tokenizer import build_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = train_hf_bpe(str(tok_dir))
    jsonl = tmp_path / "corpus.jsonl"
    write_jsonl(str(jsonl), make_texts(600, seed=3))
    prefix = str(tmp_path / "corpus")
    preprocess(PreprocessConfig([str(jsonl)], prefix, append_eod=True, progress=False),
               build_tokenizer("HuggingFaceTokenizer", tok))
    return tok, prefix + "_text_document"


def test_real_data_with_document_resets(tmp_path):
    tok, data = _corpus(tmp_path)
    argv = TINY + LATENT + _tb(tmp_path, "tb") + [
        "--data-path", data, "--split", "80,10,10", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tok, "--seq-length", "32", "--train-iters", "4", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--eval-interval", "3", "--eval-iters", "1", "--reset-position-ids",
        "--reset-attention-mask", "--eod-mask-loss",
    ]
    (code, out, err), = run_on_ranks(_main, 1, argv)
    assert code == 0, err
    # Every --eval-interval and at the end (as Megatron), then the test split once.
    assert out.count("validation at iteration") == 2 and out.count("test at iteration 4") == 1
    assert list(_losses(tmp_path, "tb")) == [1, 2, 3, 4]
    assert list(_losses(tmp_path, "tb", "valid/loss")) == [3, 4]
    assert list(_losses(tmp_path, "tb", "test/loss")) == [4]


def test_continued_pretraining_from_a_converted_hf_checkpoint(tmp_path):
    from hf_tiny import hf_model

    hf_dir, conv = str(tmp_path / "hf"), str(tmp_path / "conv")
    hf_model("llama").save_pretrained(hf_dir)
    from megatron_latent.hf.convert import convert_hf_to_checkpoint

    run_on_ranks(convert_hf_to_checkpoint, 1, hf_dir, conv)
    base = ["--mock-data", "--load", conv, "--use-checkpoint-args", "--num-workers", "0", "--seq-length", "16",
            "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2"] + LATENT
    (no_flag, with_flag), = run_on_ranks(_runs, 1, [base, base + ["--finetune"] + _tb(tmp_path, "tb")])
    assert no_flag[0] == 2 and "pass --finetune" in no_flag[2]
    assert with_flag[0] == 0, with_flag[2]
    assert "loaded weights of iteration 0" in with_flag[1] and sorted(_losses(tmp_path, "tb")) == [1, 2]


@pytest.mark.parametrize("argv, needle", [
    (["--model-preset", "nope"], "--model-preset 'nope' is unknown"),
    (["--seq-length", "128"], "training sequences of 128 tokens exceed the 64 positions (--max-position-embeddings)"),
    (["--num-latent-thoughts", "1", "--jacobi-iters", "3", "2"], "--jacobi-iters [3, 2]: need an inclusive range"),
    (["--jacobi-iters", "2", "3"], "--jacobi-iters was given for a model with --num-latent-thoughts 0"),
    (["--num-latent-thoughts", "-1"], "--num-latent-thoughts must be an integer >= 0"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide the --num-attention-heads"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], "needs --pipeline-model-parallel-size > 1"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"],
     "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1"),
    # megatron would index past a chunk's layers mid-step.
    (["--num-layers", "4", "--recompute-granularity", "full", "--recompute-num-layers", "3"],
     "--recompute-num-layers 3: uniform recompute needs a divisor of 4, the layers of the model"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
      "--recompute-num-layers", "4"],
     "--recompute-num-layers 4: uniform recompute needs a divisor of 2, the layers of a pipeline chunk "
     "(4 layers over 2 chunks)"),
])
def test_bad_model_flags_are_one_clear_error(argv, needle, capsys):
    from megatron_latent import pretrain

    assert pretrain.main(["--mock-data", "--model-preset", "tiny-llama"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


@pytest.mark.parametrize("argv, needle", [
    ([], "give exactly one data source"),
    (["--mock-data", "--finetune"], "--finetune needs --load"),
    (["--data-path", "x"], "need --tokenizer-type"),
    (["--mock-data", "--recompute-activations", "--recompute-granularity", "full"],
     "--recompute-activations is --recompute-granularity selective"),
    (["--mock-data", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"],
     "give one of --lr-warmup-fraction and --lr-warmup-iters"),
    (["--mock-data", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
     "give one of --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler"),
])
def test_bad_flags_stop_the_parser(argv, needle, capsys):
    from megatron_latent.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert needle in capsys.readouterr().err


def test_resuming_with_other_settings_names_the_flags(tmp_path):
    """A resumed run refuses other weights, other latent settings (without --finetune) and another
    lr schedule (without Megatron's override flags), each with one line naming the flags."""
    save = str(tmp_path / "ckpt")
    base = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--train-iters", "2", "--micro-batch-size", "2",
                            "--global-batch-size", "2", "--save", save, "--exit-interval", "1"]
    runs, = run_on_ranks(_runs, 1, [
        base,
        base + ["--load", save, "--hidden-size", "64"],
        base + ["--load", save, "--num-latent-thoughts", "2"],
        base + ["--load", save, "--lr", "1e-3"],
        base + ["--load", save, "--lr", "1e-3", "--override-opt_param-scheduler"] + _tb(tmp_path, "tb"),
        base + ["--load", save, "--rotary-base", "500000"],
    ])
    codes = [r[0] for r in runs]
    assert codes == [0, 2, 2, 2, 0, 2], [r[2][-500:] for r in runs]
    errors = [r[2].strip().splitlines() for r in runs[1:4] + runs[5:]]
    assert all(len(e) == 1 and e[0].startswith("error: ") for e in errors), errors
    assert "--hidden-size: 32 vs 64" in errors[0][0]
    assert "--num-latent-thoughts 1 -> 2" in errors[1][0] and "pass --finetune" in errors[1][0]
    assert "--lr: 0.003 vs 0.001" in errors[2][0] and "--override-opt_param-scheduler" in errors[2][0]
    # A field that changes the forward but not the weights: refused too, unless --finetune.
    assert "--rotary-base 10000.0 -> 500000.0" in errors[3][0] and "pass --finetune" in errors[3][0]
    assert "resumed from" in runs[4][1] and sorted(_losses(tmp_path, "tb")) == [2]


def test_divergence_stops_without_saving(tmp_path):
    """A non-finite gradient norm stops the run with one line and exit status 1; the last
    checkpoint stays the newest."""
    save = str(tmp_path / "ckpt")
    argv = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--train-iters", "6", "--micro-batch-size", "2",
                            "--global-batch-size", "2", "--lr", "1e30", "--save", save,
                            "--save-interval", "1"] + _tb(tmp_path, "tb")
    (code, _, err), = run_on_ranks(_main, 1, argv)
    assert code == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "stopping without saving" in lines[0] and "Lower --lr" in lines[0], err[-2000:]
    bad = int(lines[0].split("iteration ")[1].split(":")[0])
    assert bad >= 2 and sorted(_losses(tmp_path, "tb")) == list(range(1, bad))
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(bad - 1)


def test_a_failed_checkpoint_write_stops_every_rank(tmp_path):
    """Rank 0 cannot create --save (a file is in the way): every rank stops with the error instead
    of waiting for rank 0 in a barrier."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = TINY + ["--mock-data", "--seq-length", "16", "--train-iters", "1", "--micro-batch-size", "2",
                   "--global-batch-size", "4", "--save", str(blocker / "ckpt")]
    results = run_on_ranks(_main, 2, argv, timeout=300)
    assert [r[0] for r in results] == [1, 1]
    err = [line for line in results[0][2].splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: --save") and "Not a directory" in err[0], results[0][2][-2000:]
    assert not [line for line in results[1][2].splitlines() if line.startswith("error: ")]  # said once


def test_bf16_tracks_fp32(tmp_path):
    """--bf16 (bf16 weights and activations, fp32 main weights in the optimizer, fp32 gradient
    reduction and loss) follows the fp32 run within bf16 rounding; on CPU this checks the wiring,
    the GPU smoke checks the speed."""
    base = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--train-iters", "3", "--micro-batch-size", "2",
                            "--global-batch-size", "4"]
    (fp32, bf16), = run_on_ranks(_runs, 1, [base + _tb(tmp_path, "fp32"), base + ["--bf16"] + _tb(tmp_path, "bf16")])
    assert fp32[0] == 0 and bf16[0] == 0, bf16[2]
    a, b = _losses(tmp_path, "fp32"), _losses(tmp_path, "bf16")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 0.02 * a[step], (step, a[step], b[step])
    assert a != b  # bf16 really ran in bf16


def _max_rel_weight_diff(a_dir, b_dir):
    from megatron_latent.hf.export import read_checkpoint

    _, a, _ = read_checkpoint(a_dir)
    _, b, _ = read_checkpoint(b_dir)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-12))
               for k in a)


def test_bf16_finetune_trains_the_loaded_weights(tmp_path):
    """--bf16 --finetune: the optimizer's fp32 main weights are the loaded ones, not the random
    init (at lr 0 the saved step-1 weights are the converted ones, to bf16 rounding)."""
    from hf_tiny import hf_model
    from megatron_latent.hf.convert import convert_hf_to_checkpoint

    hf_dir, conv, out = str(tmp_path / "hf"), str(tmp_path / "conv"), str(tmp_path / "out")
    hf_model("llama").save_pretrained(hf_dir)
    run_on_ranks(convert_hf_to_checkpoint, 1, hf_dir, conv)
    argv = ["--mock-data", "--load", conv, "--use-checkpoint-args", "--finetune", "--bf16", "--num-workers", "0",
            "--seq-length", "16", "--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--lr", "0", "--min-lr", "0", "--eval-iters", "0", "--save", out]
    (code, _, err), = run_on_ranks(_main, 1, argv)
    assert code == 0, err[-2000:]
    (diff,) = run_on_ranks(_max_rel_weight_diff, 1, out, conv)
    assert diff < 1e-2, diff


# Fresh starts (no checkpoint), dropout-free so that the layout cannot change the forward either. The
# global batch ramps up (2, then 4 micro-batches: the pipeline schedule's micro-batch count changes
# between steps) and the embedding and output layer have their own lr.
FRESH = TINY + ["--num-layers", "4", "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data",
                "--seq-length", "16", "--train-samples", "10", "--rampup-batch-size", "2", "2", "2",
                "--micro-batch-size", "1", "--global-batch-size", "4", "--decoupled-lr", "3e-3",
                "--lr", "1e-3", "--eval-interval", "3", "--eval-iters", "1"]
PP2 = ["--pipeline-model-parallel-size", "2"]
TWO_RANK_LAYOUTS = [("pp2", PP2), ("pp2-vpp2", PP2 + ["--num-virtual-stages-per-pipeline-rank", "2"]),
                    ("tp2", ["--tensor-model-parallel-size", "2"])]


def _fresh_starts(tmp_path, layouts):
    """Fresh latent and vanilla driver runs at each layout, one after another in this world, and
    the full initial weights (by global name, gathered over TP and PP) each run's model starts from."""
    from megatron_latent import pretrain
    from megatron_latent.training.arguments import parse_args
    from parallel_utils import gather_full

    out = {}
    for layout, flags in layouts:
        for method, extra in (("latent", LATENT), ("vanilla", [])):
            argv = FRESH + extra + flags
            code, _, err = _main(argv + _tb(tmp_path, f"{layout}-{method}"))
            args = parse_args(argv)
            plan = pretrain.configure(args)  # the driver's seeding and layout, then its model
            weights = {}
            for chunk in pretrain.build_model(plan.cfg, plan.layout, args):
                weights.update(gather_full(chunk))
            out[(layout, method)] = code, err, weights
    return out


def test_a_fresh_start_is_the_same_model_at_every_layout(tmp_path):
    """--seed alone decides the initial weights: fresh latent and vanilla runs at PP=1, PP=2,
    PP=2 x VPP=2 and TP=2 start from exactly the same full weights, and train the same (losses
    and validation loss to fp32 tolerance), with a batch-size rampup and a decoupled lr."""
    (runs,) = run_on_ranks(_fresh_starts, 1, tmp_path, [("pp1", [])])
    runs.update(run_on_ranks(_fresh_starts, 2, tmp_path, TWO_RANK_LAYOUTS)[0])
    for key, (code, err, _) in runs.items():
        assert code == 0, (key, err[-2000:])
    for method in ("latent", "vanilla"):
        start = runs[("pp1", method)][2]
        ref = {key: _losses(tmp_path, f"pp1-{method}", key) for key in ("train/loss", "valid/loss")}
        assert sorted(ref["train/loss"]) == [1, 2, 3] and sorted(ref["valid/loss"]) == [3]
        assert list(_losses(tmp_path, f"pp1-{method}", "train/global_batch_size").values()) == [2, 4, 4]
        for layout, _ in TWO_RANK_LAYOUTS:
            weights = runs[(layout, method)][2]
            assert weights.keys() == start.keys()
            for name in start:
                assert torch.equal(weights[name], start[name]), (method, layout, name)
            for key, want in ref.items():
                got = _losses(tmp_path, f"{layout}-{method}", key)
                assert sorted(got) == sorted(want), (method, layout, key)
                for step in want:
                    assert abs(got[step] - want[step]) <= 1e-5 * want[step], (method, layout, key, step, got, want)
    # The latent runs think (the same initial weights: LLaMA's paper init does not count passes).
    assert _losses(tmp_path, "pp1-latent")[1] != _losses(tmp_path, "pp1-vanilla")[1]


def test_pipeline_micro_batch_count_is_checked_before_training(capsys):
    common = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--pipeline-model-parallel-size", "2",
                              "--micro-batch-size", "2"]
    # The full batch, a batch of the rampup (2, 4, 6, 8: the first is 1 micro-batch), and a rampup
    # batch of no whole micro-batches (4, 5, ...: 5 samples in micro-batches of 2).
    rampup = common + ["--global-batch-size", "8", "--train-samples", "40", "--rampup-batch-size"]
    results = run_on_ranks(_runs, 2, [common + ["--global-batch-size", "2"], rampup + ["2", "2", "30"],
                                      rampup + ["4", "1", "30"]])
    for i, needle in enumerate(("(--global-batch-size / (--micro-batch-size x data-parallel size)) 1 per step",
                                "--rampup-batch-size 2 2 30: its global batch 2 is 1 micro-batch per step",
                                "--rampup-batch-size 4 1 30: its global batch 5 is not divisible by "
                                "--micro-batch-size 2 x data-parallel size 1")):
        assert [r[i][0] for r in results] == [2, 2]
        err = [line for line in results[0][i][2].splitlines() if "Warning" not in line and not line.startswith("  ")]
        assert len(err) == 1 and needle in err[0], err
        assert ("--pipeline-model-parallel-size 2" in err[0]) == (i < 2)


def test_sigterm_to_the_whole_job_saves_and_exits(tmp_path):
    """A scheduler's SIGTERM reaches every process of the job (SLURM, torchrun's agent): the data
    loader worker and megatron's checkpoint-writer helpers must survive it so that
    --exit-signal-handler can finish the step, save it and exit cleanly."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save = str(tmp_path / "ckpt")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    argv = TINY + [
        "--num-workers", "1", "--mock-data", "--seq-length", "16", "--train-iters", "1000",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--save", save, "--save-interval", "2",
        "--exit-signal-handler", "--log-interval", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_latent.pretrain", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # wait until a save has started the writer's helper processes
            out.append(line)
            if "saved checkpoint of iteration 2 " in line or time.time() > deadline:
                break
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as a scheduler does
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(out) + rest
    assert proc.returncode == 0, log[-3000:]
    stopped = int(log.split("SIGTERM received: exiting after iteration ")[1].split()[0])
    assert stopped >= 2 and f"saved checkpoint of iteration {stopped} " in log
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped)


def test_without_a_launcher_it_runs_as_one_process(tmp_path):
    """`python -m megatron_latent.pretrain` with no torchrun environment trains as a world of one
    (a layout that needs more processes is one line saying how to launch); its log lines and
    metrics.jsonl carry elapsed time and an ETA."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"

    def run(argv):
        return subprocess.run([sys.executable, "-m", "megatron_latent.pretrain", *argv], env=env,
                              capture_output=True, text=True, timeout=300)

    tb = str(tmp_path / "tb")
    argv = TINY + LATENT + ["--mock-data", "--seq-length", "16", "--train-iters", "4", "--micro-batch-size", "2",
                            "--global-batch-size", "4", "--tensorboard-dir", tb]
    done = run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(_losses(tmp_path, "tb")) == [1, 2, 3, 4]
    assert all(" | elapsed " in line and " | ETA " in line
               for line in done.stdout.splitlines() if line.startswith("iteration"))
    records = [json.loads(line) for line in open(os.path.join(tb, "metrics.jsonl"))]
    elapsed, eta = [r["train/elapsed_s"] for r in records], [r["train/eta_s"] for r in records]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:])) and all(e > 0 for e in eta[:-1]) and eta[-1] == 0.0

    refused = run(argv + ["--tensor-model-parallel-size", "2"])
    err = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 2 and len(err) == 1, refused.stderr[-3000:]
    assert "launch with torchrun --nproc_per_node 2" in err[0]


def test_eta_is_the_mean_wall_time_per_step_after_the_first(monkeypatch):
    """The first step of a run pays start-up costs: once there are others, the ETA leaves it out
    (and counts evaluations and saves between steps, as wall time)."""
    from megatron_latent.training import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop._Clock(train_iters=10)
    now[0] += 5.0  # step 3 (a resumed run's first) takes 5 s
    clock.step_done(3, 5.0, 0.0, 4)
    assert clock.eta(3) == 5.0 * 7 and clock.elapsed() == 5.0
    now[0] += 0.5 + 1.0  # an evaluation after step 3 (0.5 s), then step 4 (1 s)
    clock.step_done(4, 1.0, 0.0, 4)
    now[0] += 1.0  # step 5
    clock.step_done(5, 1.0, 0.0, 4)
    assert clock.eta(5) == 1.25 * 5 and clock.elapsed() == 7.5


def test_logged_flops_and_mfu(monkeypatch, caplog):
    """TFLOP/s per device = the window's model FLOPs / its time / the world; MFU = that over the
    device's peak, logged only where the peak is known."""
    import logging
    from types import SimpleNamespace as NS

    from megatron_latent.training import loop

    written = {}
    trainer = NS(settings=NS(global_batch_size=4, seq_length=8, train_iters=10, batch_sizes=None),
                 optimizer=NS(param_groups=[{"lr": 1e-3}]), state=NS(consumed_train_samples=8),
                 metrics=NS(write=lambda step, values: written.update(values)))
    clock = loop._Clock(train_iters=10)
    for step in (1, 2, 3):
        clock.step_done(step, 0.5, 2e12, 4)  # 3 steps of 2 TFLOP in 1.5 s
    result = NS(loss=2.0, grad_norm=1.0)
    for peak in (None, 8e12):
        monkeypatch.setattr(loop, "peak_flops", lambda: peak)
        written.clear()
        with caplog.at_level(logging.INFO, logger=loop.logger.name):
            loop._report_step(trainer, 3, None, result, clock, 4)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        assert written["train/tflops_per_device"] == pytest.approx(4.0 / world)
        assert ("train/mfu" in written) == (peak is not None)
        if peak:
            assert written["train/mfu"] == pytest.approx(0.5 / world)
            assert f"MFU {50.0 / world:.1f}%" in caplog.records[-1].getMessage()


def test_use_checkpoint_args_keeps_the_checkpoint_latent_settings(tmp_path):
    """--use-checkpoint-args takes N, the J range, the evaluation J and the scaling from the
    checkpoint; a latent flag given on the command line replaces only itself."""
    first, second, third = (str(tmp_path / d) for d in ("a", "b", "c"))
    common = TINY + ["--mock-data", "--seq-length", "16", "--train-iters", "1", "--micro-batch-size", "2",
                     "--global-batch-size", "2"]
    runs, = run_on_ranks(_runs, 1, [
        common + ["--num-latent-thoughts", "1", "--jacobi-iters", "1", "4", "--jacobi-iters-eval", "5",
                  "--no-scale-embeddings", "--save", first],
        common + ["--load", first, "--use-checkpoint-args", "--finetune", "--save", second],
        common + ["--load", first, "--use-checkpoint-args", "--finetune", "--save", third,
                  "--num-latent-thoughts", "2"],
    ])
    assert [r[0] for r in runs] == [0, 0, 0], [r[2][-800:] for r in runs]

    def latent(root):
        return json.load(open(os.path.join(root, "model_config.json")))["latent"]

    kept = {"num_latent_thoughts": 1, "jacobi_iters": [1, 4], "jacobi_iters_eval": 5, "scale_embeddings": False,
            "grad_passes": None, "thought_input": "hidden", "interpolation_topk": 0, "num_pause_tokens": 0,
            "num_extra_loops": 0, "num_ponder_steps": 0, "ponder_feedback": None, "ponder_residual": False}
    assert latent(first) == latent(second) == kept
    assert "N=1 latent thoughts, training J drawn from {1, 2, 3, 4} per step, evaluation J=5" in runs[1][1]
    # A new N: the given flag wins; the scaling follows the new N's default unless given, the range stays.
    assert latent(third) == dict(kept, num_latent_thoughts=2, scale_embeddings=True)


def test_document_resets_are_refused_with_transformer_engine(monkeypatch, capsys):
    from megatron_latent import pretrain

    monkeypatch.setattr(pretrain, "transformer_engine_available", lambda: True)
    assert pretrain.main(["--mock-data", "--reset-attention-mask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reset-attention-mask is not supported with Transformer Engine" in err[0], err
