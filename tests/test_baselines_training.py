"""The baselines (pause tokens, extra loops, interpolated thoughts, pondering) through the training driver:
each trains, evaluates, checkpoints and resumes exactly (the method restored by
--use-checkpoint-args), K = 0 is the vanilla run, and bad combinations stop at start with one line
naming the flags. All training runs share one spawned world (each launch costs seconds of imports)."""

import json
import os

import pytest

from multirank import run_on_ranks
from test_pretrain import TINY, _losses, _runs, _tb

METHODS = {
    "pause": ["--num-pause-tokens", "2"],
    "loop": ["--num-extra-loops", "1"],
    "interpolated": ["--num-latent-thoughts", "1", "--thought-input", "interpolated", "--interpolation-topk", "7",
                     "--jacobi-iters", "1", "2"],
    "ponder": ["--num-ponder-steps", "1"],
}
assert TINY[-2:] == ["--eval-iters", "0"]
COMMON = TINY[:-2] + [
    "--mock-data", "--seq-length", "16", "--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size",
    "4", "--lr", "1e-2", "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per method: an uninterrupted run (`<m>-full`), one stopped at iteration 2 (`<m>-first`, saving
    to `<m>-ckpt`) and its resumption to 4 with --use-checkpoint-args and no method flag
    (`<m>-rest`); the vanilla run and K = 0 of pause and loop; a loop checkpoint resumed as
    interpolated thoughts (refused)."""
    tmp = tmp_path_factory.mktemp("baselines")
    argvs = {}
    for m, flags in METHODS.items():
        ckpt = str(tmp / f"{m}-ckpt")
        argvs[f"{m}-full"] = COMMON + flags + _tb(tmp, f"{m}-full")
        argvs[f"{m}-first"] = COMMON + flags + _tb(tmp, f"{m}-first") + ["--save", ckpt, "--exit-interval", "2"]
        argvs[f"{m}-rest"] = COMMON + _tb(tmp, f"{m}-rest") + ["--load", ckpt, "--save", ckpt, "--use-checkpoint-args"]
    k0 = (("vanilla", []), ("pause0", ["--num-pause-tokens", "0"]), ("loop0", ["--num-extra-loops", "0"]))
    for name, flags in k0:
        argvs[name] = COMMON + flags + _tb(tmp, name)
    argvs["loop-as-interpolated"] = COMMON + METHODS["interpolated"] + ["--load", str(tmp / "loop-ckpt")]
    results, = run_on_ranks(_runs, 1, list(argvs.values()), timeout=600)
    return tmp, dict(zip(argvs, results))


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_continues_exactly(trained, method):
    tmp, runs = trained
    for part in ("full", "first", "rest"):
        code, out, err = runs[f"{method}-{part}"]
        assert code == 0, (part, err[-2000:])
    full, first, rest = (_losses(tmp, f"{method}-{p}") for p in ("full", "first", "rest"))
    assert sorted(first) == [1, 2] and sorted(rest) == [3, 4]
    assert {**first, **rest} == full
    valid = [_losses(tmp, f"{method}-{p}", "valid/loss") for p in ("full", "first", "rest")]
    assert valid[0] == {**valid[1], **valid[2]} and sorted(valid[0]) == [2, 4]
    # The resumed run took the method from the checkpoint (no method flag given).
    out = runs[f"{method}-rest"][1]
    label = {"pause": "method pause K=2", "loop": "method loop K=1", "interpolated": "method interpolated N=1",
             "ponder": "method ponder K=1"}
    assert "resumed from" in out and label[method] in out
    saved = json.load(open(os.path.join(tmp, f"{method}-ckpt", "model_config.json")))["latent"]
    want = {"pause": dict(num_pause_tokens=2, num_extra_loops=0, num_latent_thoughts=0),
            "loop": dict(num_extra_loops=1, num_pause_tokens=0, num_latent_thoughts=0),
            "interpolated": dict(num_latent_thoughts=1, thought_input="interpolated", interpolation_topk=7,
                                 jacobi_iters=[1, 2]),
            "ponder": dict(num_ponder_steps=1, ponder_feedback="interpolated", num_latent_thoughts=0)}[method]
    assert {k: saved[k] for k in want} == want


def test_methods_train_differently_and_k0_is_vanilla(trained):
    tmp, runs = trained
    assert all(runs[n][0] == 0 for n in ("vanilla", "pause0", "loop0")), [runs[n][2][-1000:] for n in runs]
    vanilla = _losses(tmp, "vanilla")
    assert sorted(vanilla) == [1, 2, 3, 4]
    assert _losses(tmp, "pause0") == vanilla and _losses(tmp, "loop0") == vanilla
    assert "method vanilla" in runs["pause0"][1] and "method vanilla" in runs["loop0"][1]
    # Each method computes something else from the same data and seed.
    finals = {m: _losses(tmp, f"{m}-full")[4] for m in METHODS}
    assert len(set(finals.values()) | {vanilla[4]}) == len(METHODS) + 1, finals


def test_resuming_as_another_method_names_the_flags(trained):
    _, runs = trained
    code, _, err = runs["loop-as-interpolated"]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for part in ("--num-latent-thoughts 0 -> 1", "--thought-input hidden -> interpolated",
                 "--num-extra-loops 1 -> 0", "pass --finetune"):
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["--num-pause-tokens", "2", "--num-extra-loops", "1"],
     ["--num-pause-tokens and --num-extra-loops are exclusive"]),
    (["--num-latent-thoughts", "1", "--num-pause-tokens", "2"],
     ["--num-latent-thoughts and --num-pause-tokens are exclusive"]),
    (["--num-latent-thoughts", "1", "--num-extra-loops", "2"],
     ["--num-latent-thoughts and --num-extra-loops are exclusive"]),
    (["--thought-input", "interpolated"], ["--thought-input 'interpolated' needs latent thoughts",
                                           "--num-latent-thoughts > 0"]),
    (["--num-pause-tokens", "1", "--thought-input", "interpolated"], ["--thought-input 'interpolated' needs"]),
    (["--num-latent-thoughts", "1", "--interpolation-topk", "4"],
     ["--interpolation-topk applies to --thought-input 'interpolated' only"]),
    (["--num-extra-loops", "-1"], ["--num-extra-loops must be an integer >= 0"]),
    (["--num-ponder-steps", "2", "--num-extra-loops", "1"],
     ["--num-extra-loops and --num-ponder-steps are exclusive"]),
    (["--ponder-residual"], ["--ponder-feedback and --ponder-residual apply to pondering (--num-ponder-steps > 0)"]),
    (["--num-ponder-steps", "1", "--ponder-feedback", "hidden", "--ponder-residual"],
     ["--ponder-residual applies to the interpolated feedback"]),
    (["--num-pause-tokens", "2", "--jacobi-iters", "2", "3"],
     ["--jacobi-iters was given for a model with --num-latent-thoughts 0 (pause)"]),
    (["--num-extra-loops", "2", "--jacobi-grad-passes", "1"],
     ["--jacobi-grad-passes applies to latent thoughts (--num-latent-thoughts > 0) only"]),
])
def test_bad_method_flags_are_one_clear_error(argv, needles, capsys):
    from megatron_latent import pretrain

    assert pretrain.main(["--mock-data", "--model-preset", "tiny-llama"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err


def test_weight_decay_defaults_to_the_authors_script_per_method(single_rank):
    """PonderLM's script trains with weight decay 0.01, the other methods' with 0.1; a flag wins."""
    from megatron_latent import pretrain
    from megatron_latent.training.arguments import parse_args

    def wd(*flags):
        args = parse_args(["--mock-data", "--model-preset", "tiny-llama", *flags])
        pretrain.configure(args)
        return args.weight_decay

    assert (wd("--num-ponder-steps", "3"), wd("--num-extra-loops", "3"), wd()) == (0.01, 0.1, 0.1)
    assert wd("--num-ponder-steps", "3", "--weight-decay", "0.1") == 0.1


def test_a_method_flag_switches_the_checkpoint_method(monkeypatch):
    """With --use-checkpoint-args a method flag replaces the checkpoint's method (the others go off,
    a latent checkpoint's --jacobi-grad-passes with them); the rest of the latent settings stay."""
    from megatron_latent.config import get_preset
    from megatron_latent.training import arguments

    saved = get_preset("tiny-llama", num_latent_thoughts=1, thought_input="interpolated", grad_passes=2,
                       jacobi_iters_eval=5)
    monkeypatch.setattr(arguments, "checkpoint_model_config", lambda load, iteration: saved)
    monkeypatch.setattr(arguments, "resolve_iteration", lambda load: 1)

    def config(*flags):
        return arguments.model_config_from_args(
            arguments.parse_args(["--mock-data", "--load", "x", "--use-checkpoint-args", *flags])).latent

    assert config() == saved.latent
    lat = config("--num-pause-tokens", "3")
    assert (lat.method, lat.num_pause_tokens, lat.num_latent_thoughts) == ("pause", 3, 0)
    assert (lat.thought_input, lat.grad_passes, lat.jacobi_iters_eval) == ("hidden", None, 5)
    lat = config("--num-latent-thoughts", "2")
    assert (lat.method, lat.num_latent_thoughts, lat.grad_passes) == ("interpolated", 2, 2)
    lat = config("--thought-input", "hidden")
    assert (lat.method, lat.num_latent_thoughts) == ("latent", 1)


def test_checkpoint_configs_without_the_method_fields_still_load():
    """model_config.json of checkpoints written before the baselines (no thought_input,
    interpolation_topk, num_pause_tokens, num_extra_loops; and the older flat latent fields) read
    as latent or vanilla models."""
    from megatron_latent.config import ModelConfig, get_preset

    d = get_preset("tiny-llama", num_latent_thoughts=1).to_dict()
    for k in ("thought_input", "interpolation_topk", "num_pause_tokens", "num_extra_loops"):
        del d["latent"][k]
    cfg = ModelConfig.from_dict(d)
    assert cfg.latent.method == "latent" and cfg == get_preset("tiny-llama", num_latent_thoughts=1)
    flat = dict(d, **d.pop("latent"))
    assert ModelConfig.from_dict(flat) == cfg
    for method in (dict(num_pause_tokens=3), dict(num_extra_loops=2),
                   dict(num_latent_thoughts=1, thought_input="interpolated", interpolation_topk=5)):
        cfg = get_preset("tiny-gpt2", **method)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_cli_decodes_each_method(trained, method, capsys, single_rank):
    """`python -m megatron_latent.generate` on each method's checkpoint (KV-cached) gives the greedy
    tokens of the exact sequential reference on the same loaded weights."""
    import torch

    from megatron_latent import generate as cli
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.inference.reference import sequential_logits

    tmp, _ = trained
    ckpt = str(tmp / f"{method}-ckpt")
    prompt = [3, 17, 5]
    assert cli.main(["--load", ckpt, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4",
                     "--prefill", "exact"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == method
    model, cfg, _ = load_model_for_inference(ckpt)
    ids = list(prompt)
    for _ in range(4):
        x = torch.tensor([ids])
        logits = sequential_logits(model, x, torch.arange(len(ids))[None])[0, -1, : cfg.vocab_size]
        ids.append(int(logits.argmax()))
    assert record["ids"] == ids[len(prompt):]  # the new tokens
