"""Downstream accuracy during training: each saved checkpoint (or every --eval-tasks-interval steps'
one) is exported to Hugging Face and run through lm-evaluation-harness in a background process.

Why a subprocess and an export rather than evaluating in process: the export reads the checkpoint
at any TP/PP into one model (the checkpoint's layout is the training's), lm-eval's `hf` model is the
one users evaluate the released model with (so the numbers are those of the artifact, latent
prefill included), the training ranks keep their memory and their step schedule, and a failure
(a missing dataset, an out-of-memory, a bug in a task) cannot take the training process down.
Training is blocked only for the start of the process; one evaluation runs at a time, and a save
that comes while one runs waits (only the newest waiting one is kept).

The background process is `python -m megatron_latent.hf.downstream_eval` (the export lives above
training in the package's layers).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

# The paper's downstream tasks, as lm-evaluation-harness names them (its tables: LAMBADA, PIQA,
# WinoGrande, ARC-Easy and -Challenge, SciQ, HellaSwag).
PAPER_TASKS = ("lambada_openai", "piqa", "winogrande", "arc_easy", "arc_challenge", "sciq", "hellaswag")
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def resolve_tasks(spec: str) -> Tuple[List[str], Optional[str]]:
    """`paper`, a directory of lm-eval task YAMLs (all of its tasks), or comma/space-separated task
    names -> (task names, include path for lm-eval's TaskManager). Raises ValueError naming `eval_tasks`."""
    if spec == "paper":
        return list(PAPER_TASKS), None
    if os.path.isdir(spec):
        import yaml

        names = []
        for path in sorted(glob.glob(os.path.join(spec, "*.yaml")) + glob.glob(os.path.join(spec, "*.yml"))):
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
            if isinstance(doc, dict) and isinstance(doc.get("task"), str):
                names.append(doc["task"])
        if not names:
            raise ValueError(f"eval_tasks {spec}: a directory without task YAMLs (files with a `task:` name)")
        return names, os.path.abspath(spec)
    names = [n for n in spec.replace(",", " ").split() if n]
    if not names:
        raise ValueError("eval_tasks: no task names")
    return names, None


def flatten_results(results: Dict[str, dict]) -> Dict[str, float]:
    """lm-eval's {task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}} -> {"task/acc": x, ...}."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, "N/A" stderrs
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + (f"_{filt}" if filt and filt != "none" else "")] = float(value)
    return out


class DownstreamEvaluator:
    """Runs `hf.downstream_eval.evaluate_checkpoint` of saved iterations in a background process, one at a time, on the
    reporting rank; `poll` hands back what finished as (iteration, values) with `downstream/` keys,
    or (iteration, None) after logging one line saying why it failed."""

    def __init__(self, load: str, tasks: str, tokenizer_model: str, limit: Optional[float] = None,
                 device: str = "cpu", batch_size: str = "8", work_dir: Optional[str] = None):
        self.load, self.tasks, self.tokenizer_model = load, tasks, tokenizer_model
        self.limit, self.device, self.batch_size = limit, device, batch_size
        self.work_dir = work_dir or os.path.join(load, "downstream")
        self.running: Optional[Tuple[int, subprocess.Popen, float]] = None
        self.waiting: Optional[int] = None

    def submit(self, iteration: int) -> None:
        if self.running is None:
            self._start(iteration)
        else:
            if self.waiting is not None:
                logger.info(f"downstream evaluation of iteration {self.waiting} skipped: iteration "
                            f"{self.running[0]} is still being evaluated and {iteration} is newer")
            self.waiting = iteration  # the newest save waits; older waiting ones are skipped

    def _paths(self, iteration: int) -> Tuple[str, str]:
        folder = os.path.join(self.work_dir, f"iter_{iteration:07d}")
        return os.path.join(folder, "results.json"), os.path.join(folder, "eval.log")

    def _start(self, iteration: int) -> None:
        out, log = self._paths(iteration)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [sys.executable, "-m", "megatron_latent.hf.downstream_eval", "--load", self.load,
               "--iteration", str(iteration), "--tasks", self.tasks, "--tokenizer-model", self.tokenizer_model,
               "--output", out, "--work-dir", self.work_dir, "--device", self.device, "--batch-size", self.batch_size]
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}  # not a rank of the job
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.running = (iteration, proc, time.perf_counter())
        logger.info(f"downstream evaluation of iteration {iteration} started in the background (log: {log})")

    def poll(self, wait: bool = False) -> List[Tuple[int, Optional[Dict[str, float]]]]:
        done = []
        while self.running is not None:
            iteration, proc, start = self.running
            if proc.poll() is None and not wait:
                break
            proc.wait()
            seconds = time.perf_counter() - start
            out, log = self._paths(iteration)
            self.running = None
            if proc.returncode == 0 and os.path.isfile(out):
                with open(out) as f:
                    values = {f"downstream/{k}": v for k, v in json.load(f).items()}
                values["downstream/eval_time_s"] = seconds
                logger.info(f"downstream at iteration {iteration} ({seconds:.0f} s) | " + " | ".join(
                    f"{k[len('downstream/'):]} {v:.4f}" for k, v in values.items()
                    if k.endswith("/acc") or k.endswith("/acc_norm")))
                done.append((iteration, values))
            else:
                logger.warning(f"downstream evaluation of iteration {iteration} failed (exit status "
                               f"{proc.returncode}): {_last_line(log)}; training goes on")
                done.append((iteration, None))
            if self.waiting is not None:
                self._start(self.waiting)
                self.waiting = None
        return done


def _last_line(path: str) -> str:
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
