"""The grid of a scaling study: model sizes x methods x budgets x seeds, each a pretrain command.

Sizes come from a ladder, a family's shapes with depth and width grown together; every method of a
size shares its sizes, init formula (the paper's, `--init-method-std` unset), weight decay,
learning-rate schedule and, at equal tokens, its steps and so its data order (the order depends on
the seed and the number of samples; the seed also draws the init and the latent J of each step).
The equal-token budget of a size is `tokens_per_param` x the non-embedding parameters of its
vanilla model, for every method of that size: the 2x-layers baseline thus sees the same tokens at
half the ratio. The equal-FLOP budget gives each method the training FLOPs of that size's vanilla
run (more or fewer steps, so another data order). Latent thoughts train with
`--jacobi-grad-passes 2` by default (backpropagation through the last two passes), which matched
full backpropagation at equal tokens for 0.64x the FLOPs (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_latent.config import ModelConfig, get_preset
from megatron_latent.models.flops import model_step_flops


@dataclass(frozen=True)
class Size:
    name: str
    preset: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    lr: float


def _llama(name: str, layers: int, hidden: int, lr: float) -> Size:
    # LLaMA shape: head dim 16 at these widths, SwiGLU FFN ~8/3 H rounded up to a multiple of 16.
    return Size(name, "tiny-llama", layers, hidden, hidden // 16, 16 * math.ceil(8 * hidden / 3 / 16), lr)


def _preset(name: str, lr: float) -> Size:
    c = get_preset(name)
    return Size(name, name, c.num_layers, c.hidden_size, c.num_attention_heads, c.ffn_hidden_size, lr)


# Each ladder spans >= 10x in non-embedding parameters (at the ladder's vocabulary; see plan()).
LADDERS: Dict[str, Tuple[Size, ...]] = {
    # Seconds per run: the quick mode's (--tiny).
    "tiny": (_llama("L1-H16", 1, 16, 3e-3), _llama("L2-H16", 2, 16, 3e-3), _llama("L2-H24", 2, 24, 3e-3),
             _llama("L3-H32", 3, 32, 3e-3)),
    # A 2-core CPU in hours.
    "cpu": (_llama("L2-H32", 2, 32, 3e-3), _llama("L3-H48", 3, 48, 3e-3), _llama("L4-H64", 4, 64, 3e-3),
            _llama("L5-H80", 5, 80, 3e-3), _llama("L6-H96", 6, 96, 3e-3)),
    # The paper's LLaMA sizes (their learning rates follow Pythia's for the nearest size).
    "paper-llama": (_preset("llama-125m", 6e-4), _preset("llama-410m", 3e-4), _preset("llama-834m", 2.5e-4),
                    _preset("llama-1.4b", 2e-4)),
}


@dataclass(frozen=True)
class Method:
    name: str
    flags: Tuple[str, ...]
    changes: Tuple[Tuple[str, object], ...]  # ModelConfig.replace() of the size's config
    layers_factor: int = 1


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("vanilla", ("--num-latent-thoughts", "0"), ()),
    Method("latent-N1", ("--num-latent-thoughts", "1"), (("num_latent_thoughts", 1),)),
    Method("latent-N2", ("--num-latent-thoughts", "2"), (("num_latent_thoughts", 2),)),
    Method("vanilla-2x-layers", ("--num-latent-thoughts", "0"), (), layers_factor=2),
    Method("loop-K1", ("--num-extra-loops", "1"), (("num_extra_loops", 1),)),
)}
DEFAULT_METHODS = ("vanilla", "latent-N1", "vanilla-2x-layers", "loop-K1")


@dataclass
class Settings:
    """What every run of a study shares."""

    ladder: Sequence[Size]
    methods: Sequence[str] = DEFAULT_METHODS
    seeds: Sequence[int] = (1, 2)
    tokens_per_param: float = 20.0
    budgets: Sequence[str] = ("tokens",)  # and/or "flops"
    vocab_size: int = 512
    seq_length: int = 128
    global_batch_size: int = 16
    micro_batch_size: int = 16
    eval_iters: int = 32
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    saves_per_run: int = 4  # checkpoints per run, to resume a cut one
    grad_passes: Optional[int] = 2  # --jacobi-grad-passes of latent runs; None: every pass (the paper's)
    extra_flags: Sequence[str] = ()  # e.g. --bf16, --num-workers 0


@dataclass
class Run:
    name: str
    size: Size
    method: str
    budget: str
    seed: int
    steps: int
    cfg: ModelConfig
    params: int  # non-embedding
    tokens: int
    flops: float  # training (the mean over the J range per step) + the final evaluation
    flags: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The run's curve in the analysis: its method, and the budget when not equal tokens."""
        return self.method if self.budget == "tokens" else f"{self.method} (equal FLOPs)"


def size_config(size: Size, vocab_size: int, seq_length: int, method: str = "vanilla",
                grad_passes: Optional[int] = None) -> ModelConfig:
    m = METHODS[method]
    cfg = get_preset(size.preset).replace(
        num_layers=size.layers * m.layers_factor, hidden_size=size.hidden, num_attention_heads=size.heads,
        num_query_groups=None, ffn_hidden_size=size.ffn, vocab_size=vocab_size, seq_length=seq_length,
        name=f"{size.name}-{method}")
    if m.changes:
        cfg = cfg.replace(**dict(m.changes))
    return cfg.replace(grad_passes=grad_passes) if grad_passes and cfg.latent.num_latent_thoughts else cfg


def mean_step_flops(cfg: ModelConfig, seq_length: int, training: bool = True) -> float:
    """FLOPs of one sequence's step, averaged over the J range training draws from uniformly (the
    evaluation J for an evaluation forward)."""
    lat = cfg.latent
    if not training:
        return float(model_step_flops(cfg, seq_length, lat.jacobi_iters_eval, training=False))
    lo, hi = lat.jacobi_iters or (0, 0)
    return sum(model_step_flops(cfg, seq_length, j) for j in range(lo, hi + 1)) / (hi - lo + 1)


def plan(s: Settings) -> List[Run]:
    """Every run of the study, smallest size first; vanilla's equal-FLOP run is its equal-token one."""
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if "vanilla" not in s.methods:
        raise ValueError("the methods must include vanilla, the baseline of every multiplier")
    tokens_per_step = s.global_batch_size * s.seq_length
    runs = []
    for size in s.ladder:
        base = size_config(size, s.vocab_size, s.seq_length)
        base_params = base.num_parameters(include_embeddings=False)
        token_steps = max(1, math.ceil(s.tokens_per_param * base_params / tokens_per_step))
        vanilla_flops = token_steps * s.global_batch_size * mean_step_flops(base, s.seq_length)
        planned = set()
        for wanted in s.budgets:
            for method in s.methods:
                budget = "tokens" if method == "vanilla" else wanted  # equal FLOPs to itself: equal tokens
                if (method, budget) in planned:
                    continue
                planned.add((method, budget))
                cfg = size_config(size, s.vocab_size, s.seq_length, method, s.grad_passes)
                per_step = s.global_batch_size * mean_step_flops(cfg, s.seq_length)
                steps = token_steps if budget == "tokens" else max(1, round(vanilla_flops / per_step))
                for seed in s.seeds:
                    name = f"{size.name}-{method}" + ("-eqflops" if budget == "flops" else "") + f"-seed{seed}"
                    flops = steps * per_step + s.eval_iters * s.global_batch_size * mean_step_flops(
                        cfg, s.seq_length, training=False)
                    runs.append(Run(name, size, method, budget, seed, steps, cfg,
                                    cfg.num_parameters(include_embeddings=False), steps * tokens_per_step, flops))
    for r in runs:
        r.flags = run_flags(s, r)
    return runs


def run_flags(s: Settings, r: Run) -> List[str]:
    """The pretrain flags of one run, its data and directories excepted (see command())."""
    c = r.cfg
    flags = ["--model-preset", r.size.preset, "--num-layers", str(c.num_layers), "--hidden-size", str(c.hidden_size),
             "--num-attention-heads", str(c.num_attention_heads),
             # Megatron-LM's reading: query groups take effect with --group-query-attention only.
             "--group-query-attention", "--num-query-groups", str(c.query_groups),
             "--ffn-hidden-size", str(c.ffn_hidden_size), "--seq-length", str(s.seq_length),
             "--max-position-embeddings", str(s.seq_length), "--micro-batch-size", str(s.micro_batch_size),
             "--global-batch-size", str(s.global_batch_size), "--train-iters", str(r.steps),
             "--lr", f"{r.size.lr:g}", "--min-lr", f"{r.size.lr / 10:g}", "--lr-decay-style", "cosine",
             "--lr-warmup-fraction", f"{s.warmup_fraction:g}", "--weight-decay", f"{s.weight_decay:g}",
             "--clip-grad", "1.0", "--seed", str(r.seed), "--eval-interval", str(r.steps),
             "--eval-iters", str(s.eval_iters), "--log-interval", str(max(1, r.steps // 20)),
             "--save-interval", str(max(1, math.ceil(r.steps / max(1, s.saves_per_run))))]
    flags += METHODS[r.method].flags
    if c.latent.grad_passes:
        flags += ["--jacobi-grad-passes", str(c.latent.grad_passes)]
    return flags + list(s.extra_flags)


def command(r: Run, run_dir: str, data_flags: Sequence[str], launcher: Sequence[str]) -> List[str]:
    """The full command of a run: launcher, flags, data, and its directory for checkpoints (saved
    and resumed from) and metrics."""
    return [*launcher, *r.flags, *data_flags, "--save", run_dir, "--load", run_dir, "--tensorboard-dir", run_dir]


def format_plan(runs: Sequence[Run], tflops: float, rate_source: str, overhead_s: float, jobs: int = 1,
                gpus_per_run: int = 1) -> str:
    """A Markdown table of the runs (seeds on one line) and the total cost: FLOPs, hours per run at
    `tflops` TFLOP/s per run (plus `overhead_s`), the wall time with `jobs` runs at once, and
    GPU-hours at `gpus_per_run`."""
    head = ("| size | method | budget | layers | hidden | non-embedding params | steps | tokens | tokens/param "
            "| FLOPs per run | hours per run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    seen = set()
    for r in runs:
        key = (r.size.name, r.method, r.budget)
        if key in seen:
            continue
        seen.add(key)
        hours = (r.flops / (tflops * 1e12) + overhead_s) / 3600
        lines.append(f"| {r.size.name} | {r.method} | {r.budget} | {r.cfg.num_layers} | {r.cfg.hidden_size} "
                     f"| {r.params:,} | {r.steps:,} | {r.tokens:,} | {r.tokens / r.params:.1f} | {r.flops:.3e} "
                     f"| {hours:.3g} |")
    total = sum(r.flops for r in runs)
    hours = (total / (tflops * 1e12) + overhead_s * len(runs)) / 3600
    params = [r.params for r in runs if r.method == "vanilla"]
    lines += ["", f"{len(runs)} runs ({len(seen)} settings x seeds); vanilla non-embedding parameters "
              f"{min(params):,} to {max(params):,} ({max(params) / min(params):.1f}x); {total:.3e} FLOPs "
              f"(training at the mean J, and the final evaluation) at {tflops:g} TFLOP/s per run ({rate_source}) "
              f"plus {overhead_s:g} s per run (start-up, checkpoints): {hours:.3g} run-hours, "
              + (f"{hours * gpus_per_run:.4g} GPU-hours at {gpus_per_run} GPUs per run"
                 if gpus_per_run > 1 else f"{hours / jobs:.3g} hours of wall time at {jobs} run(s) at once")]
    return "\n".join(lines)


def slurm_array(runs: Sequence[Run], commands: Sequence[Sequence[str]], gpus: int, root: str,
                python: str = "python", parallel: Optional[int] = None) -> str:
    """A Slurm array script: task i runs run i on one node, one srun task per GPU (no torchrun
    agent, which could kill the trainer mid-save), saving on the SIGTERM sent before the time
    limit and resuming from its checkpoint when requeued."""
    limit = f"%{parallel}" if parallel else ""
    lines = ["#!/bin/bash", "# The scaling study's runs, one array task each (written by tools/scaling_study.py).",
             "#SBATCH --job-name=scaling-study", f"#SBATCH --array=0-{len(runs) - 1}{limit}", "#SBATCH --nodes=1",
             f"#SBATCH --ntasks-per-node={gpus}", f"#SBATCH --gpus-per-node={gpus}", "#SBATCH --signal=TERM@120",
             "#SBATCH --requeue", "#SBATCH --output=%x-%A_%a.out", "set -euo pipefail", f"cd {shlex.quote(root)}",
             "RUNS=("]
    for r, cmd in zip(runs, commands):
        lines.append(f"    {shlex.quote(shlex.join(cmd))}  # {r.name}")
    lines += [")",
              'eval "set -- ${RUNS[$SLURM_ARRAY_TASK_ID]}"',
              'export MASTER_ADDR="$(hostname)" MASTER_PORT="$((29500 + SLURM_ARRAY_TASK_ID % 1000))"',
              "srun --kill-on-bad-exit=1 bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
              f"WORLD_SIZE=$SLURM_NTASKS; exec {shlex.quote(python)} -m megatron_latent.pretrain \"$@\" "
              "--exit-signal-handler' _ \"$@\""]
    return "\n".join(lines) + "\n"
