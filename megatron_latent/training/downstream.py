"""Downstream accuracy during training: each saved checkpoint (or every --eval-tasks-interval steps'
one) is exported to Hugging Face and run through lm-evaluation-harness in a background process.

Why a subprocess and an export rather than evaluating in process: the export reads the checkpoint
at any TP/PP into one model (the checkpoint's layout is the training's), lm-eval's `hf` model is the
one users evaluate the released model with (so the numbers are those of the artifact, latent
prefill included), the training ranks keep their memory and their step schedule, and a failure
(a missing dataset, an out-of-memory, a bug in a task) cannot take the training process down.
Training is blocked only for the start of the process; one evaluation runs at a time, and a save
that comes while one runs waits (only the newest waiting one is kept).

    python -m megatron_latent.training.downstream --load CKPT --iteration K --tasks piqa,sciq \
        --tokenizer-model tokenizer.json --output results.json [--limit 100] [--device cuda]

writes {"<task>/<metric>": value, ...} (metrics as lm-eval names them, filters other than `none`
appended: acc, acc_norm, acc_stderr, ...).
"""

from __future__ import annotations

import argparse
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
    names -> (task names, include path for lm-eval's TaskManager). Raises ValueError naming the flag."""
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
            raise ValueError(f"--eval-tasks {spec}: a directory without task YAMLs (files with a `task:` name)")
        return names, os.path.abspath(spec)
    names = [n for n in spec.replace(",", " ").split() if n]
    if not names:
        raise ValueError("--eval-tasks: no task names")
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


def evaluate_checkpoint(load: str, iteration: int, tasks: str, work_dir: str, tokenizer_model: str,
                        limit: Optional[float] = None, device: str = "cpu", batch_size: str = "8") -> Dict[str, float]:
    """Export iteration `iteration` of `load` into `work_dir`/hf and evaluate it with lm-eval."""
    names, include = resolve_tasks(tasks)
    for flag, path in (("--load", load), ("--tokenizer-model", tokenizer_model)):
        if not os.path.exists(path):  # before the slow imports
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    from megatron_latent.hf.export import export_to_hf

    hf_dir = os.path.join(work_dir, "hf")
    export_to_hf(load, hf_dir, iteration=iteration, tokenizer_model=tokenizer_model, force=True)
    from lm_eval import simple_evaluate  # slow to import: after the export has succeeded
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                          tasks=names, task_manager=TaskManager(include_path=include), batch_size=batch_size,
                          device=device, limit=limit)
    return flatten_results(res["results"])


class DownstreamEvaluator:
    """Runs `evaluate_checkpoint` of saved iterations in a background process, one at a time, on the
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
        cmd = [sys.executable, "-m", "megatron_latent.training.downstream", "--load", self.load,
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--tasks", required=True, help="paper, a directory of task YAMLs, or names")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--output", required=True, help="results JSON, written when the evaluation succeeded")
    p.add_argument("--work-dir", default=None, help="where the export goes (default: beside --output)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction when < 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", default="8")
    args = p.parse_args(argv)
    try:
        values = evaluate_checkpoint(args.load, args.iteration, args.tasks,
                                     args.work_dir or os.path.dirname(os.path.abspath(args.output)),
                                     args.tokenizer_model, args.limit, args.device, args.batch_size)
    except Exception as e:  # noqa: BLE001  (the training log shows this one line)
        print(f"error: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(values, f, indent=1)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # guard: megatron's checkpoint code may start spawn processes
    sys.exit(main())
