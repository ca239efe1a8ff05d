"""dist_checkpointing save/load on the CPU backend: a round trip restores model and optimizer
exactly, at TP=2 and at PP=2, and training resumes on the same losses as an uninterrupted run."""

import os

import pytest

from multirank import run_on_ranks
from parallel_utils import SEQ, batch, gather_full, init_weights, max_rel_diff, tiny_config, tiny_gpt
from test_parallel_core import _forward_step

MBS = 2


def _setup(tp, pp, seed):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training import engine

    initialize_model_parallel(tp, pp, seed=seed)
    chunks = [tiny_gpt(tiny_config(tp, pp))]
    if seed == 0:
        init_weights(chunks)
    model = engine.wrap_ddp(chunks, DistributedDataParallelConfig())
    opt = engine.build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-3, clip_grad=1.0))
    engine.configure_model_for_training(model, opt)
    return model, opt


def _steps(model, opt, first, n):
    from megatron_latent.training import engine

    losses = []
    for s in range(first, first + n):
        it = iter([batch(2 * s + i, MBS) for i in range(2)])
        losses.append(engine.train_step(_forward_step, it, model, opt, 2, SEQ, MBS).loss)
    return losses


def _roundtrip(tp, pp, root):
    """Train 2 steps, save, train 2 more; then a fresh model (other seed) loads and trains the
    same 2 more steps."""
    from megatron_latent.parallel.initialize import destroy_model_parallel
    from megatron_latent.training.checkpointing import load_checkpoint, save_checkpoint

    model, opt = _setup(tp, pp, seed=0)
    _steps(model, opt, 0, 2)
    saved = gather_full(model[0].module)
    save_checkpoint(root, 2, model, opt, extra={"consumed_samples": 8})
    continued = _steps(model, opt, 2, 2)
    destroy_model_parallel()

    model, opt = _setup(tp, pp, seed=7)
    fresh = gather_full(model[0].module)
    state = load_checkpoint(root, model, opt)
    loaded = gather_full(model[0].module)
    resumed = _steps(model, opt, 2, 2)
    return {
        "fresh_diff": max_rel_diff(fresh, saved),
        "load_diff": max_rel_diff(loaded, saved),
        "continued": continued,
        "resumed": resumed,
        "state": state,
    }


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_save_load_round_trip(tmp_path, tp, pp):
    root = str(tmp_path / "ckpt")
    results = run_on_ranks(_roundtrip, 2, tp, pp, root, timeout=180)
    for r in results:
        assert r["fresh_diff"] > 0.1  # the fresh model really was different ...
        assert r["load_diff"] == 0.0  # ... and loading restored every weight exactly
        assert r["state"] == {"iteration": 2, "extra": {"consumed_samples": 8}}
    last = results[-1]  # the last pipeline stage reports losses
    assert last["resumed"] == last["continued"]  # optimizer state restored too: same next steps
    assert sorted(os.listdir(root)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "2\n"
