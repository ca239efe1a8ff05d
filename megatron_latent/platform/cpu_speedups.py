"""CPU speed patches: megatron's GPU-less paths made to cost on the CPU what they cost on a GPU
(benchmarks/bench_reference.py against the authors' code; docs/benchmarks/vs-authors-cpu-202611.md).

They run on top of the CUDA-to-CPU shim (``platform.cuda_to_cpu``), whose torch-function mode is
what they work around:

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
"""

from __future__ import annotations

import functools

import torch

from megatron_latent.platform import cuda_to_cpu


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


def _patch_block_forward() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_block import TransformerBlock

    # megatron's local attention (models.attention's fallback: bf16, attention dropout) allocates
    # its score buffer and causal mask on the device.
    DotProductAttention.forward = cuda_to_cpu.with_mode(DotProductAttention.forward)

    forward = TransformerBlock.forward

    @functools.wraps(forward)
    def block_forward(self, *args, **kwargs):
        if (
            not cuda_to_cpu.only_our_mode()
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
    # 1,000 calls a step) is a visible share of a small model's step (docs/benchmarks/vs-authors-cpu-202611.md).
    if clip_grads.to_local_if_dtensor is utils.to_local_if_dtensor:
        clip_grads.to_local_if_dtensor = _to_local_if_dtensor
    moptimizer._zero_grad_group_helper = cuda_to_cpu.without_mode(moptimizer._zero_grad_group_helper)


def fuse_optimizer(optimizer) -> None:
    """With the CPU backend, make megatron's fallback torch Adam/AdamW (Transformer Engine's and
    Apex's FusedAdam need CUDA) step with torch's fused CPU kernel: one pass over all parameters
    instead of about ten kernels per parameter, and without the mode (it only touches CPU
    tensors). The same update up to rounding. Call it again after loading optimizer state: the
    checkpoint's param groups replace these flags."""
    if not cuda_to_cpu.installed():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        if not getattr(inner.step, "without_mode", False):
            inner.step = cuda_to_cpu.without_mode(inner.step)
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


def install() -> None:
    """Install the patches (after the shim's `install`)."""
    _patch_megatron_optimizer()
    _patch_block_forward()
    _keep_freed_memory()
