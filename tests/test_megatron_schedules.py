"""Megatron-LM's lr and weight-decay schedules (megatron-core's OptimizerParamScheduler): the lr and
weight decay of every iteration are those of the scheduler Megatron-LM's training.py builds from the
same flags (steps counted in samples, advanced by the global batch); a run resumes exactly, and a
resumed run refuses a changed schedule flag without Megatron-LM's override flags."""

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from multirank import run_on_ranks
from test_pretrain import LATENT, TINY, _losses, _runs, _tb


class _Groups:
    def __init__(self, *groups):
        self.param_groups = list(groups) or [{}]


def _megatron_lm(flags, gbs, groups=None):
    """The scheduler of Megatron-LM's get_optimizer_param_scheduler for these flag values (a dict)."""
    f = dict(train_iters=None, train_samples=None, lr_decay_iters=None, lr_decay_samples=None, lr_warmup_iters=0,
             lr_warmup_samples=0, lr_warmup_fraction=None, lr_wsd_decay_iters=None, lr_wsd_decay_samples=None,
             lr_decay_style="linear", lr_wsd_decay_style="exponential", lr_warmup_init=0.0,
             weight_decay_incr_style="constant", start_weight_decay=None, end_weight_decay=None)
    f.update(flags)
    if f["train_iters"]:
        decay = (f["lr_decay_iters"] or f["train_iters"]) * gbs
        wd_steps = f["train_iters"] * gbs
        warmup = f["lr_warmup_fraction"] * decay if f["lr_warmup_fraction"] is not None else f["lr_warmup_iters"] * gbs
        wsd = f["lr_wsd_decay_iters"] * gbs if f["lr_wsd_decay_iters"] else None
    else:
        decay = f["lr_decay_samples"] or f["train_samples"]
        wd_steps = f["train_samples"]
        warmup = f["lr_warmup_fraction"] * decay if f["lr_warmup_fraction"] is not None else f["lr_warmup_samples"]
        wsd = f["lr_wsd_decay_samples"]
    wd = (f["weight_decay"], f["weight_decay"]) if f["weight_decay_incr_style"] == "constant" else (
        f["start_weight_decay"], f["end_weight_decay"])
    return OptimizerParamScheduler(
        groups or _Groups(), init_lr=f["lr_warmup_init"], max_lr=f["lr"], min_lr=f["min_lr"], lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=f["lr_decay_style"], start_wd=wd[0], end_wd=wd[1],
        wd_incr_steps=wd_steps, wd_incr_style=f["weight_decay_incr_style"], wsd_decay_steps=wsd,
        lr_wsd_decay_style=f["lr_wsd_decay_style"], use_checkpoint_opt_param_scheduler=False)


CASES = {
    "gpt3": ["--train-iters", "40", "--lr-decay-iters", "30", "--lr-warmup-fraction", "0.1"],
    "wsd": ["--train-iters", "40", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "cosine",
            "--lr-wsd-decay-iters", "10", "--lr-warmup-iters", "5", "--lr-warmup-init", "1e-4"],
    "samples": ["--train-samples", "160", "--lr-decay-samples", "120", "--lr-warmup-samples", "20",
                "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1"],
    "isqrt": ["--train-iters", "40", "--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", "3",
              "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0", "--end-weight-decay", "0.2"],
}


def _flag_values(args):
    """The schedule's flag values, as Megatron-LM's parser leaves them."""
    return {k: v for k, v in vars(args).items() if k in (
        "train_iters", "train_samples", "lr_decay_iters", "lr_decay_samples", "lr_warmup_iters", "lr_warmup_samples",
        "lr_warmup_fraction", "lr_wsd_decay_iters", "lr_wsd_decay_samples", "lr_decay_style", "lr_wsd_decay_style",
        "lr_warmup_init", "weight_decay_incr_style", "start_weight_decay", "end_weight_decay", "lr", "min_lr",
        "weight_decay")} | ({"train_iters": None} if args.train_samples else {})


@pytest.mark.parametrize("case", list(CASES))
def test_every_iteration_has_megatron_lms_lr_and_weight_decay(case):
    from megatron_latent.config import LatentSettings
    from megatron_latent.training.arguments import parse_args
    from megatron_latent.training.schedule import build_scheduler

    args = parse_args(["--mock-data", "--global-batch-size", "4", "--micro-batch-size", "4"] + CASES[case])
    if args.weight_decay is None:  # the method's default, as pretrain.configure resolves it
        args.weight_decay = LatentSettings().paper_weight_decay
    ours = build_scheduler(_Groups(), args)
    ref = _megatron_lm(_flag_values(args), gbs=4)
    assert args.train_iters == 40
    seen = set()
    for _ in range(args.train_iters):
        ours.step(1)
        ref.step(4)  # Megatron-LM steps by the global batch
        got, want = ours.optimizer.param_groups[0], ref.optimizer.param_groups[0]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12, abs=1e-15)
        assert got["weight_decay"] == pytest.approx(want["weight_decay"], rel=1e-12, abs=1e-15)
        seen.add(round(got["lr"], 12))
    assert len(seen) > 10  # the schedule moves


def _megatron_lm_batch(consumed, start, increment, samples, gbs):
    """Megatron-LM's global batch after `consumed` samples under --rampup-batch-size (its calculator's
    formula, written out)."""
    if consumed > samples:
        return gbs
    return start + int(consumed / (samples / ((gbs - start) // increment))) * increment


def _megatron_lm_train_iters(train_samples, start, increment, samples, gbs):
    """Megatron-LM's update_train_iters with a rampup, written out."""
    iterations = consumed = 0
    while consumed <= samples and consumed <= train_samples:
        consumed += _megatron_lm_batch(consumed, start, increment, samples, gbs)
        iterations += 1
    return iterations + max(train_samples - consumed, 0) // gbs


@pytest.mark.parametrize("rampup,gbs,train_samples", [((2, 2, 12), 8, 40), ((4, 4, 50), 16, 300), ((3, 6, 7), 27, 70)])
def test_rampup_batches_iterations_and_lr_are_megatron_lms(rampup, gbs, train_samples):
    """Each iteration's global batch and micro-batch count, the iteration count and the lr of every
    iteration (the scheduler stepping by the iteration's batch) are Megatron-LM's."""
    from megatron_latent.training.arguments import parse_args
    from megatron_latent.training.rampup import BatchSizes
    from megatron_latent.training.schedule import build_scheduler

    flags = ["--train-samples", str(train_samples), "--lr-warmup-samples", "5", "--lr-decay-style", "linear"]
    args = parse_args(["--mock-data", "--global-batch-size", str(gbs), "--micro-batch-size", "1",
                       "--rampup-batch-size", *map(str, rampup)] + flags)
    args.weight_decay = 0.1
    assert args.train_iters == _megatron_lm_train_iters(train_samples, *rampup, gbs)
    sizes = BatchSizes(gbs, 1, 1, rampup)
    ours = build_scheduler(_Groups(), args)
    ref = _megatron_lm({"train_samples": train_samples, "lr_warmup_samples": 5, "lr": args.lr,
                        "min_lr": args.min_lr, "weight_decay": 0.1}, gbs)
    consumed, seen = 0, []
    for _ in range(args.train_iters):
        batch = _megatron_lm_batch(consumed, *rampup, gbs)
        assert sizes.at(consumed) == (batch, batch)
        ours.step(1)
        ref.step(batch)
        assert ours.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]
        consumed += batch
        seen.append(batch)
    assert seen[0] == rampup[0] and seen[-1] == gbs and len(set(seen)) > 2
    assert sizes.stages(train_samples) == sorted(set(seen))


@pytest.mark.parametrize("argv,needle", [
    (["--train-iters", "10", "--rampup-batch-size", "4", "4", "40"], "--rampup-batch-size needs --train-samples"),
    (["--train-samples", "99", "--rampup-batch-size", "4", "5", "40"], "must be a multiple of INCREMENT 5"),
    (["--train-samples", "99", "--rampup-batch-size", "16", "4", "40"], "START 16 must be below --global-batch-size"),
    (["--train-samples", "99", "--rampup-batch-size", "4", "4", "0"], "must be >= 1"),
    (["--train-iters", "10", "--decoupled-min-lr", "1e-4"], "--decoupled-min-lr applies to --decoupled-lr"),
    (["--train-iters", "10", "--decoupled-lr", "1e-4", "--min-lr", "1e-3"], "give 0 <= --min-lr <= --decoupled-lr"),
])
def test_bad_rampup_and_decoupled_flags_stop_the_parser(argv, needle, capsys):
    from megatron_latent.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--global-batch-size", "16"] + argv)
    assert needle in capsys.readouterr().err


# Cut at iteration 3, between two batch sizes of the rampup (1, 1, 2 | 3, 3).
SCHEDULE = ["--train-samples", "10", "--lr-decay-samples", "12", "--lr-warmup-samples", "4", "--lr-decay-style",
            "WSD", "--lr-wsd-decay-style", "cosine", "--lr-wsd-decay-samples", "8", "--lr-warmup-init", "1e-4",
            "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1",
            "--rampup-batch-size", "1", "1", "4", "--decoupled-lr", "3e-2", "--decoupled-min-lr", "1e-3"]
CHANGED = {
    "--lr-warmup-init": "2e-4", "--lr-wsd-decay-style": "linear", "--lr-wsd-decay-samples": "4",
    "--end-weight-decay": "0.2", "--lr-decay-samples": "8", "--rampup-batch-size": "2", "--decoupled-lr": "2e-2",
}


def _swap(argv, flag, value):
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def _megatron_lm_steps(argv):
    """Per iteration of Megatron-LM with these flags: (global batch, consumed samples after it, lr,
    the embedding and output layer's lr)."""
    from megatron_latent.training.arguments import parse_args

    args = parse_args(argv)
    args.weight_decay = 0.1  # the lr does not depend on it
    ref = _megatron_lm(_flag_values(args), args.global_batch_size, _Groups(
        {}, {"max_lr": args.decoupled_lr, "min_lr": args.decoupled_min_lr}))
    out, consumed = {}, 0
    for step in range(1, args.train_iters + 1):
        batch = _megatron_lm_batch(consumed, *args.rampup_batch_size, args.global_batch_size)
        ref.step(batch)
        consumed += batch
        out[step] = (batch, consumed, *(g["lr"] for g in ref.optimizer.param_groups))
    return out


def _runs_and_groups(argvs, argv):
    """The driver runs, then the names of the weights in each parameter group of the optimizer
    `argv` builds, with the group's max_lr."""
    from megatron_latent import pretrain
    from megatron_latent.training import engine
    from megatron_latent.training.arguments import parse_args

    runs = _runs(argvs)
    args = parse_args(argv)
    plan = pretrain.configure(args)
    model = engine.wrap_ddp(pretrain.build_model(plan.cfg, plan.layout, args))
    optimizer, _ = pretrain.build_optimizer_and_scheduler(model, args)
    names = {id(p): n for chunk in model for n, p in chunk.named_parameters()}
    return runs, [(g["max_lr"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


def test_a_megatron_schedule_resumes_exactly_and_refuses_a_change(tmp_path):
    """--rampup-batch-size and --decoupled-lr among the schedule's flags: every iteration has
    Megatron-LM's global batch, consumed samples, lr and embedding/output lr; a run cut between two
    batch sizes of the rampup resumes bit-exactly; a changed flag is refused (and followed with
    --override-opt_param-scheduler, to the new --lr and --decoupled-lr)."""
    save = str(tmp_path / "ckpt")
    tiny = [a for i, a in enumerate(TINY) if "--lr-warmup-fraction" not in TINY[max(i - 1, 0):i + 1]]
    common = tiny + LATENT + SCHEDULE + ["--mock-data", "--seq-length", "16", "--micro-batch-size", "1",
                                         "--global-batch-size", "3", "--lr", "1e-2", "--jacobi-iters", "1", "2"]
    argvs = [common + _tb(tmp_path, "full"), common + _tb(tmp_path, "first") + ["--save", save, "--exit-interval", "3"]]
    argvs += [_swap(common, flag, value) + ["--load", save] for flag, value in CHANGED.items()]
    undecoupled = [a for i, a in enumerate(common) if "--decoupled-lr" not in common[max(i - 1, 0):i + 1]
                   and "--decoupled-min-lr" not in common[max(i - 1, 0):i + 1]]
    argvs.append(undecoupled + ["--load", save])
    override = _swap(_swap(_swap(common, "--lr-warmup-init", "2e-4"), "--lr", "2e-2"), "--decoupled-lr", "5e-2")
    argvs.append(override + _tb(tmp_path, "override") + ["--load", save, "--override-opt_param-scheduler",
                                                          "--exit-interval", "4"])
    argvs.append(common + _tb(tmp_path, "rest") + ["--load", save, "--save", save])  # last: it saves iteration 5
    (runs, groups), = run_on_ranks(_runs_and_groups, 1, argvs, common, timeout=600)
    for code, _, err in runs[:2] + runs[-1:]:
        assert code == 0, err[-2000:]
    full, first, rest = (_losses(tmp_path, n) for n in ("full", "first", "rest"))
    assert sorted(first) == [1, 2, 3] and sorted(rest) == [4, 5] and {**first, **rest} == full
    want = _megatron_lm_steps(common)
    assert [want[i][0] for i in sorted(want)] == [1, 1, 2, 3, 3]
    keys = ("train/global_batch_size", "train/consumed_samples", "train/lr", "train/decoupled_lr")
    for name in ("full", "first", "rest"):
        logged = [_losses(tmp_path, name, key) for key in keys]
        for step in logged[0]:
            assert tuple(v[step] for v in logged) == pytest.approx(want[step], rel=1e-12), (name, step)
    assert len({v[2] for v in want.values()}) >= 3 and all(v[3] != v[2] for v in want.values())
    for (code, _, err), flag in zip(runs[2:-3], CHANGED):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "the lr schedule differs from the checkpoint's" in lines[0], err
        assert flag in lines[0], (flag, lines[0])
    code, _, err = runs[-3]
    assert code == 2 and "saved with --decoupled-lr" in err and "--no-load-optim" in err, err
    code, _, err = runs[-2]
    assert code == 0, err[-2000:]  # Megatron-LM's override flag follows the new flags, their lrs included
    want = _megatron_lm_steps(override)
    for key, i in (("train/lr", 2), ("train/decoupled_lr", 3)):
        got = _losses(tmp_path, "override", key)
        assert sorted(got) == [4] and all(got[s] == pytest.approx(want[s][i], rel=1e-12) for s in got), key
    # The decoupled lr's group holds the embedding and the output layer, and nothing else.
    decoupled = [names for max_lr, names in groups if max_lr == 3e-2]
    assert len(decoupled) == 1 and [n.rsplit(".", 2)[-2] for n in decoupled[0]] == ["word_embeddings", "output_layer"]
