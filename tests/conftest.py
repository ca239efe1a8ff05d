import pytest
import torch

# Tiny models: threading costs more than it gains, and on 2 cores the spawned ranks of
# multi-rank tests need the other core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def single_rank():
    """A world of one (gloo) with megatron's parallel state at TP=PP=1, for in-process tests.

    Shared by the whole session: the process group and megatron's groups are process-global.
    Multi-rank tests spawn their own processes (tests/multirank.py) and are unaffected.
    """
    from megatron_latent.parallel.initialize import destroy_process_group, init_process_group, initialize_model_parallel

    init_process_group()
    initialize_model_parallel(1, 1)
    yield
    torch.manual_seed(0)
    destroy_process_group()  # megatron's groups, the default group and its rendezvous directory


def _megatron_groups():
    """The process groups megatron's parallel state refers to now."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    found = set()
    for value in vars(parallel_state).values():
        if isinstance(value, dict):
            value = list(value.values())
        found.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                     if isinstance(v, dist.ProcessGroup))
    return found


@pytest.fixture(autouse=True)
def _destroy_orphaned_groups():
    """Each megatron (re)initialisation in this process (the single_rank fixture; a checkpoint load
    for export or generation) creates a new set of gloo groups, each with its own threads, and
    megatron's destroy_model_parallel only forgets the old set. After each test, destroy the groups
    that neither the default group nor megatron's current state uses."""
    yield
    import sys

    if "megatron.core.parallel_state" not in sys.modules:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    keep = _megatron_groups() | {dist.group.WORLD}
    # torch keeps the registry of live groups in a private map; there is no public listing.
    for pg in [pg for pg in dist.distributed_c10d._world.pg_map if pg not in keep]:
        dist.destroy_process_group(pg)
