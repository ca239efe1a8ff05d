"""The CUDA-to-CPU shim: what megatron-core 0.16.1 needs to run without CUDA at all.

megatron-core assumes a GPU in three ways:

1. it allocates on ``device="cuda"`` / ``torch.cuda.current_device()`` (schedules, DDP buffers,
   optimizer scalars, grad clipping, checkpoint exchange);
2. its RNG tracker saves and restores the CUDA generator (``torch.cuda.get_rng_state`` and
   ``megatron.core.tensor_parallel.random._{get,set}_cuda_rng_state``);
3. a few type checks compare ``tensor.type()`` with ``'torch.cuda.FloatTensor'`` (gradient
   clipping, the fp32 / distributed optimizers).

:func:`install` adapts exactly these, without touching megatron-core on disk:

* a ``TorchFunctionMode`` (entered for the whole process, and re-entered around the backward of
  custom autograd functions, which autograd runs with no mode active) rewrites CUDA devices to CPU
  in ``device=`` arguments, ``Tensor.to`` and ``Tensor.cuda``, drops ``pin_memory=True``, and
  makes ``Tensor.type()`` report CUDA type names (1 and 3);
* ``torch.cuda``'s device, stream, synchronisation and RNG functions, which raise without CUDA,
  are replaced by CPU equivalents; the "CUDA generator" is the CPU default generator, so megatron's
  tracker forks the generator that CPU dropout really uses (2).

``torch.cuda.is_available()`` stays ``False``. What makes these paths fast is in
``platform.cpu_speedups``; when to install both is decided in ``platform``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

_MODE: "CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    # Plain ints are CUDA ordinals (torch.cuda.current_device() returns one).
    return isinstance(d, int) and not isinstance(d, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placements to the CPU at the torch-function boundary."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Fast path for the common call (no keywords, not a placement method). Most of the mode's
        # cost is torch's own dispatch into Python (docs/benchmarks/vs-authors-cpu-202611.md), not this body.
        if not kwargs and func not in _PLACEMENT_METHODS:
            return func(*args)
        if kwargs:
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        else:
            kwargs = {}
        if func is torch.Tensor.to:
            # tensor.to("cuda"), tensor.to(0), tensor.to(torch.device("cuda"), dtype)
            if len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)) and _is_cuda(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
        elif func is torch.Tensor.cuda:
            kwargs.pop("device", None)
            kwargs.pop("non_blocking", None)
            return args[0]
        elif func is torch.Tensor.pin_memory:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


_PLACEMENT_METHODS = frozenset(
    (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.type)
)


class _Stream:
    """Stand-in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _Stream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    c = torch.cuda
    c.current_device = lambda: 0
    c.set_device = lambda *a, **k: None
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.Stream = _Stream
    c.Event = _Stream
    c.current_stream = lambda *a, **k: _Stream()
    c.default_stream = lambda *a, **k: _Stream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    # The "CUDA generator" is the CPU default generator: that is the one CPU dropout draws from.
    c.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed calls this after seeding the CPU generator: nothing more to seed.
    c.manual_seed_all = lambda seed: None
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.reset_peak_memory_stats = lambda *a, **k: None
    # Without CUDA, torch's nvtx bindings are missing; megatron wraps regions in nvtx ranges.
    c.nvtx.range_push = lambda *a, **k: None
    c.nvtx.range_pop = lambda *a, **k: None
    c.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_rng() -> None:
    # megatron-core warns at import that TE/apex are missing; on a CPU machine that is expected.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.tensor_parallel import random as mrandom

    # These go through torch.cuda._lazy_call, which never runs its callback without CUDA.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Its fork warns when the CPU generator moved inside it; here the forked generator is the CPU
    # one, so every dropout in a fork (sequence parallelism, attention) would warn.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())


def _patch_custom_backward() -> None:
    # Autograd runs custom Functions' backward with the torch-function mode stack cleared, yet
    # megatron allocates on "cuda" there (sequence-parallel reduce-scatter, recomputation).
    from torch.autograd.function import BackwardCFunction

    BackwardCFunction.apply = with_mode(BackwardCFunction.apply)


def only_our_mode() -> bool:
    stack = torch.overrides._get_current_function_mode_stack()
    return len(stack) == 1 and isinstance(stack[0], CudaToCpuMode)


def without_mode(fn):
    """`fn` run with the mode suspended, for loops over parameters that only read and set `.grad`
    and update CPU tensors: under the mode each attribute access costs a microsecond. Another
    mode on the stack (a user's) keeps the stack as it is."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not only_our_mode():
            return fn(*args, **kwargs)
        with torch.overrides._pop_mode_temporarily():
            return fn(*args, **kwargs)

    wrapped.without_mode = True
    return wrapped


def with_mode(fn):
    """`fn` run under the mode when none is active (the suspended block, a custom backward)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if torch.overrides._get_current_function_mode_stack():
            return fn(*args, **kwargs)
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapped


def installed() -> bool:
    return _MODE is not None


def install() -> None:
    """Patch torch.cuda and megatron's RNG hooks, and enter the mode for the life of the process:
    megatron allocates on "cuda" from anywhere, including autograd hooks and the checkpoint
    writer. Once (the caller checks `installed()`)."""
    global _MODE
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_custom_backward()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
