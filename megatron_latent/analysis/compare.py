"""Compare finished training runs: one table (parameters, tokens, exact FLOPs, validation loss and
perplexity, wall time) and one plot of validation loss against training tokens.

A run directory holds its checkpoint (`model_config.json`, `iter_*`) and its `metrics.jsonl`, each
either in the directory itself or in `ckpt/` and `logs/` below it (the quickstart's layout). What
the table needs comes from the newest checkpoint: the model, and the run's flags (seed, sequence
length, global batch size) from which every step's J is redrawn exactly as training drew it.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_latent.analysis.figures import save_png
from megatron_latent.checkpoint_layout import MODEL_CONFIG_FILE, checkpoint_model_config, read_common, resolve_iteration
from megatron_latent.config import ModelConfig
from megatron_latent.models.flops import model_decode_flops, model_step_flops
from megatron_latent.training.metrics import metric_keys, read_metrics


@dataclass
class RunSummary:
    label: str
    cfg: ModelConfig
    iteration: int
    seq_length: int
    global_batch_size: int
    seed: int
    parameters: int
    train_tokens: int
    train_flops: int  # exact: forward + backward of every step at that step's J
    inference_flops_per_token: float  # KV-cached decoding, mean over a training-length sequence
    valid_steps: List[int]
    valid_losses: List[float]
    # train/elapsed_s of the last logged step (training and evaluations, of the process that ran it)
    wall_time_s: Optional[float]
    # the newest downstream accuracy of each task (downstream/<task>/acc, lm-eval during training)
    downstream_acc: Dict[str, float] = field(default_factory=dict)

    @property
    def valid_loss(self) -> float:
        return self.valid_losses[-1]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def _find(run_dir: str, sub: str, name: str) -> str:
    for folder in (run_dir, os.path.join(run_dir, sub)):
        if os.path.isfile(os.path.join(folder, name)):
            return folder
    raise FileNotFoundError(f"{run_dir}: no {name} in it or in {sub}/ (a run directory holds its checkpoint "
                            "and metrics.jsonl)")


def train_flops(cfg: ModelConfig, seq_length: int, global_batch_size: int, seed: int, steps: int) -> int:
    """Exact FLOPs of steps 1..`steps` (any method): each at the J training drew for it (from seed
    and step; latent thoughts only)."""
    lat = cfg.latent
    total = 0
    for step in range(1, steps + 1):
        j = lat.jacobi_iters_for_step(step, seed) if lat.num_latent_thoughts else 0
        total += model_step_flops(cfg, seq_length, j)
    return total * global_batch_size


def inference_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per generated token of KV-cached decoding, averaged over the positions of one
    training-length sequence (0 .. seq_length-1)."""
    return sum(model_decode_flops(cfg, p) for p in range(seq_length)) / seq_length


def summarize_run(run_dir: str, label: Optional[str] = None) -> RunSummary:
    ckpt = _find(run_dir, "ckpt", MODEL_CONFIG_FILE)
    logs = _find(run_dir, "logs", "metrics.jsonl")
    iteration = resolve_iteration(ckpt)
    common = read_common(ckpt, iteration)
    cfg = checkpoint_model_config(ckpt, iteration, common)
    args = common.get("extra", {}).get("args", {})
    missing = [k for k in ("seed", "global_batch_size") if k not in args]
    if missing:
        raise ValueError(f"{ckpt}: the checkpoint does not record the run's {', '.join(missing)}")
    seq = args.get("seq_length") or cfg.seq_length
    gbs, seed = int(args["global_batch_size"]), int(args["seed"])
    metrics = os.path.join(logs, "metrics.jsonl")
    steps, losses = read_metrics(metrics, "valid/loss")
    try:
        wall = read_metrics(metrics, "train/elapsed_s")[1][-1]
    except ValueError:
        wall = None
    return RunSummary(
        label=label or os.path.basename(os.path.normpath(run_dir)), cfg=cfg, iteration=iteration, seq_length=seq,
        global_batch_size=gbs, seed=seed, parameters=cfg.num_parameters(),
        train_tokens=iteration * gbs * seq, train_flops=train_flops(cfg, seq, gbs, seed, iteration),
        inference_flops_per_token=inference_flops_per_token(cfg, seq),
        valid_steps=steps, valid_losses=losses, wall_time_s=wall, downstream_acc=newest_accuracies(metrics),
    )


def newest_accuracies(metrics_jsonl: str) -> Dict[str, float]:
    """{task: accuracy at the newest evaluated iteration} from the downstream/<task>/acc records."""
    out = {}
    for key in metric_keys(metrics_jsonl, "downstream/*/acc"):
        steps, values = read_metrics(metrics_jsonl, key)
        out[key.split("/")[1]] = values[max(range(len(steps)), key=steps.__getitem__)]
    return out


def _group_key(r: RunSummary):
    """Runs that differ only in the seed."""
    d = r.cfg.to_dict()
    return (d.pop("name"), str(d), r.seq_length, r.global_batch_size, r.iteration)


def _mean_spread(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def format_table(runs: Sequence[RunSummary], group_seeds: bool = True) -> str:
    """A Markdown table, one row per run, or per group of runs that differ only in the seed (then
    the loss, perplexity and time are mean ± standard deviation over the seeds)."""
    groups: Dict = {}
    for r in runs:
        groups.setdefault(_group_key(r) if group_seeds else id(r), []).append(r)
    tasks = sorted({t for r in runs for t in r.downstream_acc})
    head = ("| run | method | layers | hidden | parameters | training tokens | training FLOPs | inference FLOPs/token "
            "| valid loss | valid ppl | wall time (s) |" + "".join(f" {t} acc |" for t in tasks))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for members in groups.values():
        r = members[0]
        label = r.label if len(members) == 1 else f"{r.label} ({len(members)} seeds)"
        lines.append(
            f"| {label} | {r.cfg.latent.label} | {r.cfg.num_layers} | {r.cfg.hidden_size} "
            f"| {r.parameters:,} | {r.train_tokens:,} | {r.train_flops:.3e} | {r.inference_flops_per_token:.3e} "
            f"| {_mean_spread([m.valid_loss for m in members])} "
            f"| {_mean_spread([math.exp(m.valid_loss) for m in members])} "
            f"| {_mean_spread([m.wall_time_s for m in members])} |"
            + "".join(f" {_mean_spread([m.downstream_acc.get(t) for m in members])} |" for t in tasks))
    return "\n".join(lines)


def verdict(runs: Sequence[RunSummary], latent_label: str, baselines: Sequence[str]) -> str:
    """One sentence: how the latent run's final validation loss compares with each baseline's. Runs
    sharing a label (seeds) are averaged, and the larger of the two labels' seed spreads (standard
    deviation) is given beside each difference."""
    by: dict = {}
    for r in runs:
        by.setdefault(r.label, []).append(r)

    def loss(label):
        values = [r.valid_loss for r in by[label]]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)

    lat, (lat_loss, lat_sd) = by[latent_label][0], loss(latent_label)
    parts = []
    for b in baselines:
        base, (base_loss, base_sd) = by[b][0], loss(b)
        d = lat_loss - base_loss
        spreads = [x for x in (lat_sd, base_sd) if x is not None]
        spread = f", seed spread {max(spreads):.4f}" if spreads else ""
        parts.append(f"{'beats' if d < 0 else 'does not beat'} {b} ({lat_loss:.4f} vs {base_loss:.4f}, "
                     f"{d:+.4f}{spread}; {lat.train_flops / base.train_flops:.2f}x its training FLOPs, "
                     f"{lat.inference_flops_per_token / base.inference_flops_per_token:.2f}x its inference FLOPs)")
    return f"{latent_label} " + "; ".join(parts) + "."


def plot_valid_loss(runs: Sequence[RunSummary], out_png: str) -> None:
    """Validation loss against training tokens, one curve per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot([s * r.tokens_per_step for s in r.valid_steps], r.valid_losses, marker="o", markersize=3,
                label=f"{r.label} ({r.cfg.latent.label}, {r.cfg.num_layers} layers)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, out_png)
