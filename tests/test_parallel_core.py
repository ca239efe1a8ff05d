"""megatron-core on the CPU backend: every parallel layout trains exactly like one rank.

Each layout runs the same three optimizer steps (Adam, gradient clipping active) over the same
global batch of four micro-batches; losses, gradient norms, the first step's gradients and the
final weights must equal the single-rank run's.
"""

from functools import partial

import pytest
import torch

from multirank import run_on_ranks
from parallel_utils import SEQ, batch, gather_full, init_weights, max_rel_diff, tiny_config, tiny_gpt

GLOBAL_MICROBATCHES, MBS, STEPS, CLIP = 4, 2, 3, 0.05


def _forward_step(data_iterator, model):
    from megatron_latent.training.engine import token_loss

    b = next(data_iterator)
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
    return output, partial(token_loss, None)  # the engine's per-token loss convention


def _train(tp, pp, vpp=None, distributed_optimizer=False):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training import engine

    dp = initialize_model_parallel(tp, pp, vpp)
    cfg = tiny_config(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    chunks = [tiny_gpt(cfg, vp_stage=v) for v in range(vpp)] if vpp else [tiny_gpt(cfg)]
    init_weights(chunks)
    model = engine.wrap_ddp(
        chunks, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    )
    opt = engine.build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            # With the default eps=1e-8, Adam turns gradients of ~1e-9 (rounding noise) into
            # full-size steps of random sign; a larger eps keeps the comparison well conditioned.
            adam_eps=1e-3,
            clip_grad=CLIP,
            use_distributed_optimizer=distributed_optimizer,
        ),
    )
    engine.configure_model_for_training(model, opt)

    per_rank = GLOBAL_MICROBATCHES // dp
    dp_rank = ps.get_data_parallel_rank()
    losses, norms, first_grads = [], [], None
    for step in range(STEPS):
        start = step * GLOBAL_MICROBATCHES + dp_rank * per_rank
        batches = [batch(start + i, MBS) for i in range(per_rank)]
        # Interleaved schedules take one iterator per chunk, in lockstep.
        iters = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
        result = engine.train_step(_forward_step, iters, model, opt, per_rank, SEQ, MBS)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if step == 0:
            first_grads = _merged(model, grads=True)
    return {
        "losses": losses if ps.is_pipeline_last_stage(ignore_virtual=True) else None,
        "norms": norms,
        "grads": first_grads,
        "weights": _merged(model, grads=False),
    }


def _merged(model, grads):
    out = {}
    for chunk in model:
        out.update(gather_full(chunk.module, grads=grads))
    return out


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(_train, 1, 1, 1)[0]


def _check(results, reference, tol=1e-5, grads=True):
    losses = [r["losses"] for r in results if r["losses"] is not None]
    assert losses, "no rank reported a loss"
    for got in losses:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(reference["losses"]), rtol=tol, atol=0)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(reference["norms"]), rtol=tol, atol=0)
        if grads:
            assert max_rel_diff(r["grads"], reference["grads"]) < tol
        assert max_rel_diff(r["weights"], reference["weights"]) < tol


def test_reference_trains_with_clipping(reference):
    # The clip threshold is far below the gradient norm, so clipping is exercised on every step,
    # and the loss goes down.
    assert all(n > 10 * CLIP for n in reference["norms"])
    assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.parametrize(
    "tp,pp,vpp,world",
    [(2, 1, None, 2), (1, 2, None, 2), (1, 1, None, 2), (1, 2, 2, 2), (2, 2, None, 4)],
    ids=["tp2", "pp2-1f1b", "dp2", "pp2-interleaved", "tp2-pp2"],
)
def test_layout_equals_single_rank(reference, tp, pp, vpp, world):
    _check(run_on_ranks(_train, world, tp, pp, vpp), reference)


def test_distributed_optimizer_equals_single_rank(reference):
    # Each rank's gradient buffer holds the reduced gradient of its own shard only (reduce-scatter),
    # so the full gradients are not comparable; the norms, losses and weights are.
    _check(run_on_ranks(_train, 2, 1, 1, None, True), reference, grads=False)


def _sgd_clipped_step(tp):
    """One SGD step with clipping; returns weights before/after, gradients and the norm."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training import engine

    initialize_model_parallel(tp, 1)
    chunks = [tiny_gpt(tiny_config(tp, 1))]
    init_weights(chunks)
    model = engine.wrap_ddp(chunks, DistributedDataParallelConfig())
    opt = engine.build_optimizer(
        model, OptimizerConfig(optimizer="sgd", lr=0.1, sgd_momentum=0.0, weight_decay=0.0, clip_grad=CLIP))
    engine.configure_model_for_training(model, opt)
    before = _merged(model, grads=False)
    result = engine.train_step(_forward_step, iter([batch(i, MBS) for i in range(2)]), model, opt, 2, SEQ, MBS)
    return before, _merged(model, grads=True), _merged(model, grads=False), result.grad_norm


def test_gradient_clipping_scales_the_update():
    before, grads, after, norm = run_on_ranks(_sgd_clipped_step, 2, 2)[0]
    # Clipping rescales the gradient buffer in place: what is left is the clipped gradient, whose
    # full (un-sharded) norm is clip / (norm + 1e-6) times the reported pre-clip norm ...
    assert norm > 10 * CLIP
    clipped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    assert clipped_norm == pytest.approx(norm * CLIP / (norm + 1e-6), rel=1e-5)
    # ... and SGD stepped along it.
    for k in before:
        torch.testing.assert_close(after[k], before[k] - 0.1 * grads[k], rtol=0, atol=1e-7)


def test_one_start_up_path_and_its_teardown():
    """init_process_group: a file-store world of one without a launcher (its rendezvous directory
    gone after destroy_process_group), torchrun's world from its environment, a caller's own
    process group kept; a layout needing more processes than a world of one is one error saying
    how to launch. In a fresh interpreter (this one may hold the single_rank world)."""
    import os
    import socket
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, sys
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron_latent.config import ConfigError
        from megatron_latent.parallel import initialize as init

        try:
            init.initialize_model_parallel(2, 1)
            raise AssertionError("a world of one took TP=2")
        except ConfigError as e:
            assert "needs 2 processes (or a multiple): launch with torchrun --nproc_per_node 2" in str(e), e
        assert not dist.is_initialized()  # refused before any rendezvous
        for _ in range(2):  # a second world after the first is torn down
            assert init.init_process_group() and not init.init_process_group()
            rendezvous = init._rendezvous.name
            assert os.path.isdir(rendezvous) and dist.get_world_size() == 1
            assert init.initialize_model_parallel(1, 1) == 1 and ps.model_parallel_is_initialized()
            init.destroy_process_group()
            assert not dist.is_initialized() and not ps.model_parallel_is_initialized()
            assert not os.path.exists(rendezvous)

        port = sys.argv[1]  # torchrun's environment
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        assert init.init_process_group() and init._rendezvous is None
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        init.destroy_process_group()
        assert not dist.is_initialized()

        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=0, world_size=1)  # the caller's
        assert not init.init_process_group()
        init.initialize_model_parallel(1, 1)
        init.destroy_process_group()
        assert dist.is_initialized() and not ps.model_parallel_is_initialized()
        print("ok")
        """
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code, port], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
