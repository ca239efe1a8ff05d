"""What the loop measures besides the loss, free of flags: Megatron's diagnostics (the weights'
norm, memory, a torch profiler trace of a range of steps) and the pass loop's own signals
(models/pass_stats.py), reduced over the ranks that hold them.

The loop calls `step_begins` / `step_ends` around every training step and `values` at each log
step, on every rank (the reductions are collectives); the reporting rank writes what it returns.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.utils import unwrap_model

from megatron_latent import platform
from megatron_latent.models.pass_stats import PassStats

logger = logging.getLogger(__name__)


def params_norm(model_chunks) -> float:
    """L2 norm of all weights, each counted once: tensor-parallel shards summed over the model-parallel
    group, replicated weights (norms, tied or mirrored copies) taken once. Every rank of a
    model-parallel group must call it."""
    total = torch.zeros(1, dtype=torch.float64, device=platform.device())
    for chunk in unwrap_model(list(model_chunks)):
        for p in chunk.parameters():
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                total += p.detach().double().pow(2).sum()
    if dist.is_initialized() and ps.get_model_parallel_group() is not None:
        dist.all_reduce(total, group=ps.get_model_parallel_group())
    return float(total.sqrt())


def memory_values() -> Dict[str, float]:
    """This process's memory: on GPU the allocator's current, peak and reserved bytes; on CPU the peak
    resident set size (Linux reports it in KiB)."""
    if torch.cuda.is_available():
        return {"memory/allocated_bytes": float(torch.cuda.memory_allocated()),
                "memory/max_allocated_bytes": float(torch.cuda.max_memory_allocated()),
                "memory/reserved_bytes": float(torch.cuda.memory_reserved())}
    return {"memory/peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


class StepProfiler:
    """torch profiler over steps [start, end) of this rank: a Chrome trace `<dir>/<host>_rank<r>.<ns>.pt.trace.json`
    (TensorBoard's profiler plugin reads the folder; Perfetto and chrome://tracing open the file)."""

    def __init__(self, trace_dir: str, start: int, end: int):
        self.trace_dir, self.start, self.end = trace_dir, start, end
        self.prof = None
        self.path: Optional[str] = None

    def step_begins(self, step: int) -> None:
        if step == self.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # A schedule, so that each step is marked (ProfilerStep#) for TensorBoard's step view.
            self.prof = torch.profiler.profile(
                activities=activities, record_shapes=True, on_trace_ready=self._export,
                schedule=torch.profiler.schedule(wait=0, warmup=0, active=self.end - self.start, repeat=1))
            self.prof.start()

    def step_ends(self, step: int) -> None:
        if self.prof is None:
            return
        self.prof.step()  # after the last step of the range: the trace is exported
        if step == self.end - 1:
            self.prof.stop()
            self.prof = None
            logger.info(f"profiled steps {self.start}..{self.end - 1}: trace in {self.path}")

    def _export(self, prof) -> None:
        os.makedirs(self.trace_dir, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.path = os.path.join(self.trace_dir, f"{socket.gethostname()}_rank{rank}.{time.time_ns()}.pt.trace.json")
        prof.export_chrome_trace(self.path)


class Monitor:
    """The loop's extra measurements, enabled piece by piece."""

    def __init__(self, params_norm: bool = False, memory: bool = False, profiler: Optional[StepProfiler] = None,
                 thought_stats: bool = False):
        self.log_params_norm, self.log_memory, self.profiler = params_norm, memory, profiler
        self.thought_stats = thought_stats
        self._stats: List[PassStats] = []

    def step_begins(self, model_chunks, step: int, log: bool) -> None:
        if self.profiler is not None:
            self.profiler.step_begins(step)
        if self.thought_stats:
            # Recorded only on the steps that are logged: the others pay nothing.
            self._stats = []
            for stage in unwrap_model(list(model_chunks)):
                stage.pass_stats = PassStats() if log else None
                if log:
                    self._stats.append(stage.pass_stats)

    def step_ends(self, model_chunks, step: int) -> None:
        if self.profiler is not None:
            self.profiler.step_ends(step)
        if self.thought_stats:
            for stage in unwrap_model(list(model_chunks)):
                stage.pass_stats = None

    def values(self, model_chunks) -> Dict[str, float]:
        """The log step's values; every rank calls it (collectives), the reporting rank writes them."""
        out: Dict[str, float] = {}
        if self.thought_stats and self._stats:
            out.update(PassStats.reduce(self._stats))
            self._stats = []
        if self.log_params_norm:
            out["train/params_norm"] = params_norm(model_chunks)
        if self.log_memory:
            out.update(memory_values())
        return out
