"""Every use of megatron-core internals (names with a leading underscore, or behaviour we work
around), in one place, written for megatron-core 0.16.1.

Importing this module with another megatron-core version warns once, naming both versions. A
warning, not an error: a release that keeps these internals works unchanged (and a version bump
is tried by running the tests, which an error would block), and each helper below fails with a
clear error naming the installed version where the internal it needs is gone, instead of
misbehaving. The CPU backend's own patches of megatron (its RNG hooks, its fallback kernels) stay
in platform/, where everything about running without CUDA is kept (checked by
tests/test_platform.py).

Users: training/checkpointing.py (the writer queue, the optimizer state around a load),
models/transformer_config.py (the recompute settings that fail).
"""

from __future__ import annotations

import importlib.metadata
import warnings

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

WRITTEN_FOR = "0.16.1"


def installed_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"megatron-core {installed_version()} has no {what}; megatron_latent/compat.py was written for "
        f"{WRITTEN_FOR}: adapt it or install megatron-core=={WRITTEN_FOR}"
    )


if installed_version() != WRITTEN_FOR:
    warnings.warn(
        f"megatron-core {installed_version()} is installed; megatron_latent/compat.py works around "
        f"internals of {WRITTEN_FOR} (checkpoint writer, distributed-optimizer load)",
        stacklevel=2,
    )


def unsupported_recompute(fields: dict, biased_serial_mlp: bool, model_name: str):
    """Why megatron-core 0.16.1 cannot run the TransformerConfig `fields`, or None: the selective
    recompute of a biased MLP in a serial (not parallel-residual) layer, whose TransformerLayer
    returns the fc2 bias Parameter through its CheckpointFunction, whose backward then recurses
    without end."""
    if (fields.get("recompute_granularity") == "selective" and "mlp" in (fields.get("recompute_modules") or ())
            and biased_serial_mlp):
        return (f"recompute_modules mlp does not work with the biased MLP of model {model_name!r} "
                "(megatron-core 0.16.1); use recompute_granularity full")
    return None


# megatron's async checkpoint writer keeps a module-level queue served by a spawned process.


def writer_queue_started() -> bool:
    if not hasattr(filesystem_async, "_results_queue"):
        raise _missing("dist_checkpointing.strategies.filesystem_async._results_queue")
    return filesystem_async._results_queue is not None


def start_writer_queue() -> None:
    """Start the writer's queue server now (it starts lazily at the first save otherwise)."""
    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is None:
        raise _missing("dist_checkpointing.strategies.filesystem_async._get_write_results_queue")
    start()


def materialize_optimizer_state(optimizer) -> None:
    """torch's Adam allocates its state (and `step`) at the first step; the distributed optimizer's
    load needs it allocated before the checkpoint is read into it. megatron's own dummy step (zero
    gradients) does that; whatever it does to the weights is overwritten by the load. Other
    optimizers load into an empty state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer.state:
            continue
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is None:
            raise _missing("DistributedOptimizer._init_optimizer_states_with_dummy_values")
        init()


def restore_adam_steps(optimizer) -> None:
    """The distributed optimizer's load sets torch Adam's per-parameter `step` from the param
    groups and then copies the bucket state over it, which holds the placeholder step of
    `materialize_optimizer_state`; the groups keep the true one (megatron-core 0.16.1, torch
    Adam; Transformer Engine's and Apex's Adam keep the step in the groups only)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.full_like(state["step"], float(group["step"]))


def load_optimizer_state(optimizer, state, keep_lr_bounds: bool = False) -> None:
    """`optimizer.load_state_dict(state)`; with `keep_lr_bounds`, each parameter group keeps the
    max_lr and min_lr it was built with. megatron-core 0.16.1 keeps them in the groups, where the
    scheduler reads them, and a load replaces them with the checkpoint's: --override-opt_param-
    scheduler would otherwise follow the flags' schedule with the checkpoint's --lr, --min-lr
    and --decoupled-lr.

    Distributed-optimizer state saved in model space (`fully_reshardable`): megatron-core 0.16.1
    copies every entry of torch Adam's per-parameter state from the checkpoint, which has no `step`
    (it is kept in the param groups), and fails with KeyError 'step'. That state is loaded in
    megatron's two parts, the param groups (with the step) and then the tensors, with `step` out of
    Adam's state while the tensors are copied and put back (from the groups) afterwards."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    bounds = [[(g["max_lr"], g["min_lr"]) for g in o.optimizer.param_groups] for o in opts] if keep_lr_bounds else []
    _load_optimizer_state(opts, state)
    for opt, kept in zip(opts, bounds):
        for group, (max_lr, min_lr) in zip(opt.optimizer.param_groups, kept):
            group["max_lr"], group["min_lr"] = max_lr, min_lr


def _load_optimizer_state(opts, state) -> None:
    if len(opts) == 1:
        states = [state]
    else:
        states = [v for _, v in sorted(state.items())] if isinstance(state, dict) else list(state)
    for opt, st in zip(opts, states):
        if not (isinstance(opt, DistributedOptimizer) and isinstance(st, dict)
                and st.get("param_state_sharding_type") == "fully_reshardable"):
            opt.load_state_dict(st)
            continue
        load_tensors = getattr(opt, "load_parameter_state_from_fully_reshardable", None)
        if load_tensors is None:
            raise _missing("DistributedOptimizer.load_parameter_state_from_fully_reshardable")
        opt.load_state_dict({k: v for k, v in st.items() if k not in ("param_state", "param_state_sharding_type")})
        inner = opt.optimizer
        steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
        try:
            load_tensors(st["param_state"])
        finally:
            for p, step in steps.items():
                inner.state[p]["step"] = step


def mark_decoupled_lr_groups(optimizer) -> None:
    """megatron-core 0.16.1 builds --decoupled-lr's parameter group (the embedding and output
    layer, its own max_lr/min_lr) with `is_decoupled_lr` False, so it has the same identifying key
    (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) as the default group. A load matches
    the checkpoint's groups to the optimizer's by that key: both groups get one saved group (the
    plain optimizers then fail on its size, the distributed one silently gives every weight the
    decoupled lr). Marking the group, as the key intends, keeps the two apart. It is the only
    group whose lr schedule is not the default one (`default_config` False)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(getattr(opt, "config", None), "decoupled_lr", None) is None or opt.optimizer is None:
            continue
        for group in opt.optimizer.param_groups:
            if "default_config" not in group or "is_decoupled_lr" not in group:
                raise _missing("the param groups' default_config and is_decoupled_lr fields")
            if not group["default_config"]:
                group["is_decoupled_lr"] = True
