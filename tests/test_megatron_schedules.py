"""Megatron-LM's lr and weight-decay schedules (megatron-core's OptimizerParamScheduler): the lr and
weight decay of every iteration are those of the scheduler Megatron-LM's training.py builds from the
same flags (steps counted in samples, advanced by the global batch); a run resumes exactly, and a
resumed run refuses a changed schedule flag without Megatron-LM's override flags."""

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from multirank import run_on_ranks
from test_pretrain import LATENT, TINY, _losses, _runs, _tb


class _Groups:
    def __init__(self):
        self.param_groups = [{}]


def _megatron_lm(flags, gbs):
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
        _Groups(), init_lr=f["lr_warmup_init"], max_lr=f["lr"], min_lr=f["min_lr"], lr_warmup_steps=warmup,
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


@pytest.mark.parametrize("case", list(CASES))
def test_every_iteration_has_megatron_lms_lr_and_weight_decay(case):
    from megatron_latent.config import LatentSettings
    from megatron_latent.training.arguments import parse_args
    from megatron_latent.training.schedule import build_scheduler

    args = parse_args(["--mock-data", "--global-batch-size", "4", "--micro-batch-size", "4"] + CASES[case])
    if args.weight_decay is None:  # the method's default, as pretrain.configure resolves it
        args.weight_decay = LatentSettings().paper_weight_decay
    ours = build_scheduler(_Groups(), args)
    ref = _megatron_lm({k: v for k, v in vars(args).items() if k in (
        "train_iters", "train_samples", "lr_decay_iters", "lr_decay_samples", "lr_warmup_iters", "lr_warmup_samples",
        "lr_warmup_fraction", "lr_wsd_decay_iters", "lr_wsd_decay_samples", "lr_decay_style", "lr_wsd_decay_style",
        "lr_warmup_init", "weight_decay_incr_style", "start_weight_decay", "end_weight_decay", "lr", "min_lr",
        "weight_decay")} | ({"train_iters": None} if args.train_samples else {}), gbs=4)
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


SCHEDULE = ["--train-samples", "16", "--lr-decay-samples", "12", "--lr-warmup-samples", "4", "--lr-decay-style",
            "WSD", "--lr-wsd-decay-style", "cosine", "--lr-wsd-decay-samples", "8", "--lr-warmup-init", "1e-4",
            "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1"]
CHANGED = {
    "--lr-warmup-init": "2e-4", "--lr-wsd-decay-style": "linear", "--lr-wsd-decay-samples": "4",
    "--end-weight-decay": "0.2", "--lr-decay-samples": "8",
}


def _swap(argv, flag, value):
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def test_a_megatron_schedule_resumes_exactly_and_refuses_a_change(tmp_path):
    save = str(tmp_path / "ckpt")
    tiny = [a for i, a in enumerate(TINY) if "--lr-warmup-fraction" not in TINY[max(i - 1, 0):i + 1]]
    common = tiny + LATENT + SCHEDULE + ["--mock-data", "--seq-length", "16", "--micro-batch-size", "2",
                                         "--global-batch-size", "4", "--lr", "1e-2", "--jacobi-iters", "1", "2"]
    argvs = [common + _tb(tmp_path, "full"), common + _tb(tmp_path, "first") + ["--save", save, "--exit-interval", "2"],
             common + _tb(tmp_path, "rest") + ["--load", save, "--save", save]]
    argvs += [_swap(common, flag, value) + ["--load", save] for flag, value in CHANGED.items()]
    argvs.append(_swap(common, "--lr-warmup-init", "2e-4") + ["--load", save, "--override-opt_param-scheduler"])
    runs, = run_on_ranks(_runs, 1, argvs, timeout=600)
    for code, _, err in runs[:3]:
        assert code == 0, err[-2000:]
    full, first, rest = (_losses(tmp_path, n) for n in ("full", "first", "rest"))
    assert sorted(first) == [1, 2] and sorted(rest) == [3, 4] and {**first, **rest} == full
    lrs = [_losses(tmp_path, n, "train/lr") for n in ("full", "first", "rest")]
    assert {**lrs[1], **lrs[2]} == lrs[0] and len(set(lrs[0].values())) >= 3
    for (code, _, err), flag in zip(runs[3:-1], CHANGED):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "the lr schedule differs from the checkpoint's" in lines[0], err
        assert flag in lines[0], (flag, lines[0])
    code, _, err = runs[-1]
    assert code == 0, err[-2000:]  # Megatron-LM's override flag follows the new flags
