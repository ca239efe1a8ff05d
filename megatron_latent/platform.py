"""Device choice, and the CPU backend that lets megatron-core 0.16.1 run without CUDA.

megatron-core assumes a GPU in three ways:

1. it allocates on ``device="cuda"`` / ``torch.cuda.current_device()`` (schedules, DDP buffers,
   optimizer scalars, grad clipping, checkpoint exchange);
2. its RNG tracker saves and restores the CUDA generator (``torch.cuda.get_rng_state`` and
   ``megatron.core.tensor_parallel.random._{get,set}_cuda_rng_state``);
3. a few type checks compare ``tensor.type()`` with ``'torch.cuda.FloatTensor'`` (gradient
   clipping, the fp32 / distributed optimizers).

On a machine without CUDA, :func:`install_cpu_backend` adapts exactly these, without touching
megatron-core on disk:

* a ``TorchFunctionMode`` (entered for the whole process, and re-entered around the backward of
  custom autograd functions, which autograd runs with no mode active) rewrites CUDA devices to CPU
  in ``device=`` arguments, ``Tensor.to`` and ``Tensor.cuda``, drops
  ``pin_memory=True``, and makes ``Tensor.type()`` report CUDA type names (1 and 3);
* ``torch.cuda``'s device, stream, synchronisation and RNG functions, which raise without CUDA,
  are replaced by CPU equivalents; the "CUDA generator" is the CPU default generator, so megatron's
  tracker forks the generator that CPU dropout really uses (2).

It also makes megatron's GPU-less paths cost on the CPU what they cost on a GPU
(benchmarks/bench_reference.py against the authors' code; docs/benchmarks.md):

* the transformer blocks' forward runs with the mode suspended (:func:`_patch_block_forward`):
  under a Python mode every torch call pays torch's dispatch into Python, and every
  ``torch.nn.functional`` call its slow override path, about 1,500 calls per latent forward of a
  small model. Blocks allocate nothing on a device except with sequence parallelism (gathers) or
  a KV cache, where the mode stays, and in megatron's own attention, which gets it back;
* megatron's fallbacks for the multi-tensor kernels of Transformer Engine / Apex (gradient norm
  and scaling: a torch.norm and a host sync per parameter) become torch's foreach kernels, and
  :func:`fuse_optimizer` gives its fallback torch Adam torch's fused CPU kernel; the optimizer's
  per-parameter loops (Adam's step, zeroing gradients) run without the mode;
* glibc's allocator keeps freed memory (:func:`_keep_freed_memory`). On a GPU torch's caching
  allocator keeps a step's activation blocks for the next step; on the CPU torch frees them to
  glibc, which unmaps blocks above its mmap threshold and trims the heap top, so the next step
  page-faults the same memory in again, zero-filled: 42,000 faults (170 MB) per latent training
  step of the bench_reference model.

``torch.cuda.is_available()`` stays ``False``. Importing this module (or the package) changes
nothing: the backend switches itself on at parallel start-up (``parallel.initialize``), the path
every use of megatron's parallel state takes, and entry points that run megatron code without it
call :func:`install_cpu_backend` themselves. Tools that never reach megatron (preprocessing, HF
mapping) pay neither its import (~2 s) nor the mode's cost per torch call (~1 us). With CUDA
present it is never installed: on a GPU machine this module changes nothing. It is the only place
in the project that knows about this.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "cuda_available",
    "fuse_optimizer",
    "install_cpu_backend",
    "cpu_backend_installed",
    "device",
    "distributed_backend",
]

_MODE: "_CudaToCpuMode | None" = None

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


def cuda_available() -> bool:
    """True when a CUDA device can be used (the real check, unaffected by the backend)."""
    return torch.cuda.is_available()


def cpu_backend_installed() -> bool:
    return _MODE is not None


def device() -> torch.device:
    """The device this process computes on: the local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    # Plain ints are CUDA ordinals (torch.cuda.current_device() returns one).
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placements to the CPU at the torch-function boundary."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Fast path for the common call (no keywords, not a placement method). Most of the mode's
        # cost is torch's own dispatch into Python (measured in docs/benchmarks.md), not this body.
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

    BackwardCFunction.apply = _with_mode(BackwardCFunction.apply)


def _multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract: the norm of all tensors of the list as a 1-element
    fp32 tensor (and the per-tensor norms when asked)."""
    norms = torch.stack(torch._foreach_norm(tensor_lists[0])).float()
    return torch.linalg.vector_norm(norms).reshape(1), norms if per_tensor else None


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract: dst = src * scale, list by list (in place when the
    lists are the same tensors, as in gradient clipping)."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


def _to_local_if_dtensor(tensor):
    """megatron.core.utils.to_local_if_dtensor without its no_grad block around plain tensors.
    Gradient clipping calls it twice per parameter per step, and under the mode entering no_grad
    costs 4 us."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def _only_our_mode() -> bool:
    stack = torch.overrides._get_current_function_mode_stack()
    return len(stack) == 1 and isinstance(stack[0], _CudaToCpuMode)


def _without_mode(fn):
    """`fn` run with the mode suspended, for loops over parameters that only read and set `.grad`
    and update CPU tensors: under the mode each attribute access costs a microsecond. Another
    mode on the stack (a user's) keeps the stack as it is."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not _only_our_mode():
            return fn(*args, **kwargs)
        with torch.overrides._pop_mode_temporarily():
            return fn(*args, **kwargs)

    wrapped.without_mode = True
    return wrapped


def _with_mode(fn):
    """`fn` run under the mode when none is active (the suspended block, a custom backward)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if torch.overrides._get_current_function_mode_stack():
            return fn(*args, **kwargs)
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapped


def _patch_block_forward() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_block import TransformerBlock

    # megatron's local attention (models.attention's fallback: bf16, attention dropout) allocates
    # its score buffer and causal mask on the device.
    DotProductAttention.forward = _with_mode(DotProductAttention.forward)

    forward = TransformerBlock.forward

    @functools.wraps(forward)
    def block_forward(self, *args, **kwargs):
        if (
            not _only_our_mode()
            or len(args) > 2  # inference_context may come positionally
            or self.config.sequence_parallel
            or kwargs.get("inference_context") is not None
            or kwargs.get("inference_params") is not None
        ):
            return forward(self, *args, **kwargs)
        with torch.overrides._pop_mode_temporarily():
            return forward(self, *args, **kwargs)

    TransformerBlock.forward = block_forward


def _patch_megatron_optimizer() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    # Only megatron's own fallbacks are replaced (Transformer Engine and Apex need CUDA anyway).
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _multi_tensor_l2norm
    for module in (clip_grads, moptimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _multi_tensor_scale
    # The per-parameter loops of a step outside the model: what the mode costs there (about
    # 1,000 calls a step) is a visible share of a small model's step (docs/benchmarks.md).
    if clip_grads.to_local_if_dtensor is utils.to_local_if_dtensor:
        clip_grads.to_local_if_dtensor = _to_local_if_dtensor
    moptimizer._zero_grad_group_helper = _without_mode(moptimizer._zero_grad_group_helper)


def fuse_optimizer(optimizer) -> None:
    """With the CPU backend, make megatron's fallback torch Adam/AdamW (Transformer Engine's and
    Apex's FusedAdam need CUDA) step with torch's fused CPU kernel: one pass over all parameters
    instead of about ten kernels per parameter, and without the mode (it only touches CPU
    tensors). The same update up to rounding. Call it again after loading optimizer state: the
    checkpoint's param groups replace these flags."""
    if _MODE is None:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if not getattr(inner.step, "without_mode", False):
            inner.step = _without_mode(inner.step)
        for group in [inner.defaults] + inner.param_groups:
            if group.get("differentiable") or group.get("capturable"):
                continue
            group["fused"], group["foreach"] = True, False


# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_memory() -> bool:
    """Make glibc serve blocks up to 32 MiB (its largest mmap threshold) from the heap and never
    trim the heap's top (below 2 GiB free), so a training step reuses the previous step's pages;
    like the CUDA caching allocator, the process keeps its peak. Both are needed: a fixed trim threshold alone
    also freezes the mmap threshold at its 128 KiB default. The MALLOC_* environment variables,
    when set, win. False where the C library is not glibc."""
    import ctypes
    import os

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok &= bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # a C int
    return ok


def install_cpu_backend() -> bool:
    """Install the CPU backend if CUDA is absent. Idempotent; returns whether it is installed."""
    global _MODE
    if _MODE is not None:
        return True
    if cuda_available():
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_custom_backward()
    _patch_megatron_optimizer()
    _patch_block_forward()
    _keep_freed_memory()
    _MODE = _CudaToCpuMode()
    # Entered for the life of the process: megatron allocates on "cuda" from anywhere, including
    # autograd hooks and the checkpoint writer.
    _MODE.__enter__()
    return True
