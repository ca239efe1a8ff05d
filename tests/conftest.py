import os
import tempfile

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
    import torch.distributed as dist

    import megatron_latent  # noqa: F401
    from megatron_latent.parallel.initialize import initialize_model_parallel

    if not dist.is_initialized():
        path = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    initialize_model_parallel(1, 1)
    yield
    torch.manual_seed(0)
