"""`python -m megatron_latent.generate` end to end: a checkpoint saved at TP=2 (spawned ranks)
decodes in one process (TP=1) to the tokens the TP=2 model generated, by ids or by text through
a tokenizer built here; --iteration picks the weights; bad input fails with one clear line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from data_fixtures import train_hf_bpe
from multirank import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_IDS = [11, 250, 3, 97]
TEXT = "the model thinks in latent space"
SAMPLING = dict(temperature=1.3, top_k=40, top_p=0.9, seed=5)


def _save_at_tp2(root, tokenizer_path):
    """Save iterations 5 and 7 (different weights) of a tiny LLaMA-GQA N=1 model at TP=2; return
    what the TP=2 model itself generates from each."""
    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.inference import PrefillParams, SamplingParams, generate
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training.checkpointing import save_checkpoint
    from tiny import full_weights, small_config

    tok = HuggingFaceTokenizer(tokenizer_path)
    initialize_model_parallel(2, 1)
    cfg = small_config("llama", 1, vocab_size=tok.vocab_size)
    greedy = SamplingParams(vocab_size=cfg.vocab_size)
    sampled = SamplingParams(greedy=False, vocab_size=cfg.vocab_size, **SAMPLING)
    tolerance = PrefillParams("tolerance", tol=1e-6)
    out = {}
    for iteration, scale in ((5, 0.5), (7, 1.0)):
        full = {k: v * scale if "norm" not in k else v for k, v in full_weights(cfg).items()}
        model = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False)
        load_full_into_model(model, full, cfg)
        model.eval()
        save_checkpoint(root, iteration, [model])
        text_ids = tok.tokenize(TEXT)
        out[iteration] = {
            "greedy": generate(model, [PROMPT_IDS], 6, sampling=greedy).ids[0],
            "sampled": generate(model, [PROMPT_IDS], 6, sampling=sampled).ids[0],
            "text_greedy": generate(model, [text_ids], 5, sampling=greedy).ids[0],
            "text_tol_iters": generate(model, [text_ids], 1, prefill=tolerance).prefill_iters,
        }
    if torch.distributed.get_rank() == 0:
        write_model_config(cfg, root)
    out["vocab_size"] = cfg.vocab_size
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen_cli")
    tokenizer = train_hf_bpe(str(tmp))
    root = str(tmp / "ckpt")
    expected = run_on_ranks(_save_at_tp2, 2, root, tokenizer, timeout=300)
    assert expected[0] == expected[1]
    return root, tokenizer, expected[0]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_latent.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    json_lines = [ln for ln in lines if ln.startswith("{")]
    assert len(json_lines) == 1 and lines[-1] == json_lines[0], proc.stdout
    return json.loads(lines[-1])


def test_cli_decodes_a_tp2_checkpoint_at_tp1(checkpoint):
    root, tokenizer, expected = checkpoint
    ids = ",".join(map(str, PROMPT_IDS))
    # One process per decoding mode is what the CLI is for; three runs cover the flags.
    greedy = _cli("--load", root, "--prompt-ids", ids, "--max-new-tokens", "6")
    assert greedy["prompt_ids"] == PROMPT_IDS and greedy["text"] is None
    assert greedy["ids"] == expected[7]["greedy"] and greedy["iteration"] == 7
    sampled = _cli("--load", root, "--prompt-ids", ids, "--max-new-tokens", "6", "--iteration", "5",
                   *[a for k, v in SAMPLING.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    assert sampled["ids"] == expected[5]["sampled"] and sampled["iteration"] == 5
    assert expected[5]["sampled"] != expected[5]["greedy"]  # the sampling flags did something
    text = _cli("--load", root, "--prompt", TEXT, "--max-new-tokens", "5", "--prefill", "tolerance",
                "--jacobi-tol", "1e-6", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer)
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(tokenizer)
    assert text["prompt_ids"] == tok.tokenize(TEXT)
    # Jacobi to 1e-6 then exact decoding: the tokens of the exact prefill at TP=2.
    assert text["ids"] == expected[7]["text_greedy"]
    assert text["text"] == tok.detokenize(text["ids"])
    assert text["prefill"] == "tolerance" and text["prefill_iters"] == expected[7]["text_tol_iters"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--load", "{root}/nope", "--prompt-ids", "1,2", "--max-new-tokens", "2"], "--load"),
        (["--load", "{root}", "--prompt-ids", "1,x", "--max-new-tokens", "2"], "--prompt-ids '1,x'"),
        (["--load", "{root}", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--iteration", "3"], "iter_0000003"),
        (["--load", "{root}", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--stop-at-eod"], "--stop-at-eod"),
        (["--load", "{root}", "--prompt", "hi", "--max-new-tokens", "2", "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", "{root}/none.json"], "none.json"),
        (["--load", "{root}", "--prompt-ids", "1", "--max-new-tokens", "2", "--prefill", "tolerance", "--jacobi-tol",
          "0"], "--prefill 'tolerance' needs --jacobi-tol > 0, got 0.0"),
        (["--load", "{root}", "--prompt-ids", "1", "--max-new-tokens", "2", "--prefill", "jacobi",
          "--jacobi-iters-eval", "-1"], "--jacobi-iters-eval -1: needs --prefill 'jacobi' and a value >= 0"),
    ],
)
def test_cli_bad_input_one_clear_line(tmp_path, capsys, args, message):
    from megatron_latent.generate import main

    os.makedirs(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt", "w") as f:
        f.write("1\n")
    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.config import get_preset

    write_model_config(get_preset("tiny-llama"), str(tmp_path / "ckpt"))
    assert main([a.format(root=tmp_path / "ckpt") for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize(
    "args",
    [
        ["--load", "x", "--max-new-tokens", "2"],  # no prompt
        ["--load", "x", "--prompt", "a", "--prompt-ids", "1", "--max-new-tokens", "2"],
        ["--load", "x", "--prompt", "a", "--max-new-tokens", "2"],  # text without tokenizer
        ["--load", "x", "--prompt-ids", "1", "--max-new-tokens", "2", "--temperature", "0"],
        ["--load", "x", "--prompt-ids", "1", "--max-new-tokens", "2", "--greedy"],  # greedy is the default
        ["--load", "x", "--prompt-ids", "1", "--max-new-tokens", "2", "--prefill", "exact", "--jacobi-iters-eval", "2"],
    ],
)
def test_cli_flag_conflicts(args):
    from megatron_latent.generate import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
