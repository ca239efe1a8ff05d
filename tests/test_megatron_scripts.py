"""Megatron-LM's own example scripts, shrunk to tiny sizes, 2 ranks, mock data and 3 steps, run
unchanged otherwise: they build the model they describe, train, print a note for each flag without
effect here, follow Megatron-LM's lr schedule, and the flags refused stop with one line. The flag
sets are those of Megatron-LM's examples (core_v0.16.1): the GPT-3 175B script, the LLaMA-3 8B
script and the older GPT-345M model-parallel script."""

import math

import pytest

from multirank import run_on_ranks
from test_pretrain import _losses, _runs, _tb

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--mock-data", "--vocab-size", "128", "--num-workers", "0"]

# examples/gpt3/train_gpt3_175b_distributed.sh (--fp16 is refused, and so is its --rampup-batch-size with
# --train-iters, as by Megatron-LM: below).
GPT3 = TINY + [
    "--attention-backend", "auto", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006",
    "--clip-grad", "1.0", "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6",
    "--lr-warmup-fraction", ".001", "--lr-decay-iters", "430000", "--tensor-model-parallel-size", "2",
    "--split", "949,50,1", "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000",
    "--eval-iters", "1"]
# examples/llama/train_llama3_8b_h100_fp8.sh without its FP8 flags (refused) and with iterations for
# its sample counts.
LLAMA3 = TINY[:4] + [
    "--use-mcore-models", "--ffn-hidden-size", "112", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "16", "--max-position-embeddings", "16",
    "--position-embedding-type", "rope", "--rotary-base", "1000000", "--rotary-percent", "1.0",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--swiglu", "--init-method-std", "0.0134",
    "--attention-backend", "fused", "--apply-layernorm-1p", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "0.00015", "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5",
    "--lr-decay-style", "cosine", "--clip-grad", "1.0",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16",
    "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level",
    "1", "--exit-duration-in-mins", "235", "--tensor-model-parallel-size", "2", "--context-parallel-size", "1",
    "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--tiktoken-pattern", "v2",
    "--split", "99,1,0", "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers", "0",
    "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "100", "--save-interval", "1000",
    "--log-throughput", "--profile", "--profile-step-start", "4", "--profile-step-end", "6", "--ckpt-format",
    "torch_dist", "--distributed-timeout-minutes", "60"]
# examples/pretrain_gpt_distributed_with_mp.sh (GPT-345M), pipeline-parallel (--fp16 -> --bf16).
GPT345M = TINY + [
    "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr",
    "0.00015", "--train-iters", "3", "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr",
    "1.0e-5", "--weight-decay", "1e-2", "--lr-warmup-fraction", ".01", "--clip-grad", "1.0", "--bf16",
    "--split", "949,50,1", "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000",
    "--eval-iters", "1", "--distributed-backend", "nccl"]
RUNS = {"gpt3": GPT3, "llama3": LLAMA3, "llama3-latent": LLAMA3 + ["--num-latent-thoughts", "1"],
        "gpt345m": GPT345M, "gpt345m-latent": GPT345M + ["--num-latent-thoughts", "1", "--jacobi-iters", "1", "1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scripts")
    ranks = run_on_ranks(_runs, 2, [argv + _tb(tmp, name) for name, argv in RUNS.items()], timeout=600)
    # (exit codes, printed output, errors) of each run; the last pipeline stage prints.
    results = [(tuple(r[0] for r in per), "".join(r[1] for r in per), "".join(r[2] for r in per))
               for per in zip(*ranks)]
    return tmp, dict(zip(RUNS, results))


@pytest.mark.parametrize("name", list(RUNS))
def test_script_trains_three_steps(runs, name):
    tmp, results = runs
    codes, out, err = results[name]
    assert codes == (0, 0), err[-3000:]
    losses = _losses(tmp, name)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert ("method latent N=1" if name.endswith("latent") else "method vanilla") in out


def test_gpt3_builds_megatron_defaults_and_follows_its_schedule(runs):
    tmp, results = runs
    out = results["gpt3"][1]
    assert ("architecture: 2 layers, hidden 32, FFN 128, 4 heads of 8, LayerNorm eps 1e-05, GeLU, learned absolute "
            "positions, biases, tied embeddings, vocab 128 (padded 128), 16 positions, dropout hidden 0.1 attention "
            "0.1") in out
    assert "Megatron-LM init (normal, std 0.006, output projections 0.003)" in out
    assert "TP=2 PP=1 DP=1" in out
    assert "note: --attention-backend auto has no effect here" in out
    # Megatron-LM's warmup: --lr-warmup-fraction of --lr-decay-iters (430 iterations), linear from 0.
    lr = _losses(tmp, "gpt3", "train/lr")
    for step in (1, 2, 3):
        assert lr[step] == pytest.approx(6.0e-5 * step / 430, rel=1e-12)


def test_llama3_builds_its_model_and_notes_what_has_no_effect(runs):
    tmp, results = runs
    out = results["llama3"][1]
    # The script gives no --normalization: Megatron-LM's LayerNorm, with its 1p scaling.
    assert ("architecture: 2 layers, hidden 32, FFN 112, 4 heads of 16 in 2 query groups, LayerNorm (1p) eps 1e-05, "
            "SwiGLU, RoPE (base 1e+06), no biases, untied embeddings") in out
    assert "TP=2 PP=1 DP=1" in out
    for flag in ("--use-mcore-models", "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc",
                 "--context-parallel-size 1", "--overlap-grad-reduce", "--overlap-param-gather",
                 "--ckpt-format torch_dist", "--tokenizer-type NullTokenizer"):
        assert f"note: {flag}" in out, flag
    # Cosine from --lr to --min-lr over --train-iters (no --lr-decay-iters, no warmup).
    lr = _losses(tmp, "llama3", "train/lr")
    for step in (1, 2, 3):
        cos = 0.5 * (math.cos(math.pi * step / 3) + 1)
        assert lr[step] == pytest.approx(0.00001 + cos * (0.00015 - 0.00001), rel=1e-12)
        # The embedding and output layer: --decoupled-lr to --decoupled-min-lr on the same schedule.
        assert _losses(tmp, "llama3", "train/decoupled_lr")[step] == pytest.approx(4.5e-5 + cos * (5e-4 - 4.5e-5),
                                                                                   rel=1e-12)


def test_gpt345m_runs_pipeline_parallel(runs):
    tmp, results = runs
    out = results["gpt345m"][1]
    assert "TP=1 PP=2 DP=1" in out and "note: --distributed-backend nccl has no effect here" in out
    lr = _losses(tmp, "gpt345m", "train/lr")
    assert lr[2] == pytest.approx(0.00015 * 2 / 3200, rel=1e-12)


@pytest.mark.parametrize("flags, needle", [
    (["--fp16"], "--fp16: fp16 needs dynamic loss scaling"),
    (["--rampup-batch-size", "16", "16", "5859375"], "--rampup-batch-size needs --train-samples: Megatron-LM"),
    (["--train-samples", "1953125000"], "give one of --train-iters and --train-samples"),
    (["--fp8-format", "hybrid"], "--fp8-format hybrid: FP8 needs Transformer Engine"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2: context parallelism splits the sequence"),
    (["--ckpt-format", "torch"], "--ckpt-format torch: checkpoints are megatron's distributed format"),
])
def test_refused_script_flags_are_one_line(flags, needle, capsys):
    from megatron_latent.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(GPT3 + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m megatron_latent.pretrain: error: ") and needle in err[-1], err[-1]


def test_the_docs_show_the_table():
    import os

    from megatron_latent.training.arguments import build_parser
    from megatron_latent.training.megatron_flags import END, START, markdown

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "megatron_flags.md")
    doc = open(path).read()
    table = doc.split(START)[1].split(END)[0]
    assert table == markdown(build_parser()), (
        "docs/megatron_flags.md is out of date: python -m megatron_latent.training.arguments --update "
        "docs/megatron_flags.md")
