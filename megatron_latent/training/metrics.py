"""Training metrics: one JSON object per line in `metrics.jsonl`, TensorBoard scalars when the
`tensorboard` package is installed, and a Weights & Biases run when one is opened (`WandbRun`).
Written by the one rank that holds the reported loss."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

# Dense bf16 peak of one accelerator, for MFU. Model FLOPs are exact (models/flops.py).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsWriter:
    """Appends to `<log_dir>/metrics.jsonl`. A run starting at iteration K (0 when fresh) first
    drops the records after K (steps an interrupted run made past its last checkpoint, which this
    run redoes), so the file holds one history; TensorBoard events after K are purged likewise.
    `wandb` (a WandbRun) gets every scalar too, at the same step."""

    def __init__(self, log_dir: Optional[str], enabled: bool, start_iteration: int = 0,
                 wandb: Optional["WandbRun"] = None):
        self.jsonl = None
        self.tb = None
        self.wandb = wandb if enabled else None
        if not (enabled and log_dir):
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "metrics.jsonl")
        if os.path.isfile(path):
            _truncate_after(path, start_iteration)
        self.jsonl = open(path, "a", buffering=1)
        try:  # optional, and slow to import
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir, purge_step=start_iteration + 1)
        except ImportError:
            logger.warning(f"tensorboard is not installed: writing {log_dir}/metrics.jsonl only")

    def write(self, step: int, values: Dict[str, float]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            try:
                self.wandb.log(step, values)
            except Exception as e:  # noqa: BLE001  (W&B failing mid-run must not stop training)
                logger.warning(f"W&B stopped logging at iteration {step} ({type(e).__name__}: {e}); "
                               "metrics.jsonl and TensorBoard go on")
                self.wandb = None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.close()
            except Exception as e:  # noqa: BLE001
                logger.warning(f"W&B did not finish its run ({type(e).__name__}: {e})")


# ------------------------------------------------------------------------------ Weights & Biases
WANDB_STATE_FILE = "wandb_run.json"


def wandb_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is None


class WandbRun:
    """One W&B run across restarts. Its id and the last step it was given are kept in
    `<state_dir>/wandb_run.json` (the checkpoint directory), so a restarted job resumes the same run
    (`resume="allow"`). W&B cannot rewind a run's history: steps a restarted job redoes (those an
    interrupted job logged after its last checkpoint) are not logged again; a resumed run reproduces
    them exactly, so the curves lose nothing and do not zig-zag."""

    def __init__(self, project: str, save_dir: str, state_dir: str, name: Optional[str] = None,
                 entity: Optional[str] = None, config: Optional[Dict[str, Any]] = None):
        import wandb

        os.makedirs(save_dir, exist_ok=True)
        os.makedirs(state_dir, exist_ok=True)
        self.state_path = os.path.join(state_dir, WANDB_STATE_FILE)
        state = {}
        if os.path.isfile(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
        # Steps up to here were logged by an earlier job of this run.
        self.logged_before = int(state.get("last_step", 0))
        self.last_step = self.logged_before
        self.run = wandb.init(project=project, name=name or None, entity=entity or None, dir=save_dir,
                              id=state.get("id"), resume="allow", config=config or {})
        self.run.define_metric("downstream/*", step_metric="downstream/iteration")
        self.id = self.run.id
        self._save_state()

    def log(self, step: int, values: Dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if any(k.startswith("downstream/") for k in scalars):
            # Evaluated in the background, they arrive after later steps were logged: W&B takes no
            # earlier step, so they carry their iteration as their own x axis.
            self.run.log({**scalars, "downstream/iteration": step}, commit=False)
            return
        if step <= self.logged_before:
            return
        if scalars:
            self.run.log(scalars, step=step)
        if step > self.last_step:
            self.last_step = step
            self._save_state()

    def _save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"id": self.id, "last_step": self.last_step}, f)
        os.replace(tmp, self.state_path)

    def close(self) -> None:
        self.run.finish()


def _truncate_after(path: str, iteration: int) -> None:
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] > iteration:
                continue
        except (ValueError, KeyError, TypeError):
            pass  # not ours to judge: kept as it was
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _records(path: str):
    """(line number, record) of each non-empty line of a metrics.jsonl; ValueError naming the line."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None


def metric_keys(path: str, pattern: str = "*"):
    """The keys of a metrics.jsonl matching a glob `pattern` (fnmatch), in the order first seen."""
    import fnmatch

    keys = {}
    for _, record in _records(path):
        keys.update((k, None) for k in record if k != "iteration" and fnmatch.fnmatchcase(k, pattern))
    return list(keys)


def read_metrics(path: str, key: str):
    """(iterations, values) of `key` in a metrics.jsonl; a clear error naming the file and line."""
    steps, values = [], []
    for _, record in _records(path):
        if key in record and record[key] is not None:
            steps.append(record["iteration"])
            values.append(float(record[key]))
    if not steps:
        raise ValueError(f"{path}: no {key!r} values")
    return steps, values
