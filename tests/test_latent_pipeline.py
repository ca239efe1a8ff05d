"""Pipeline parallelism of the multi-pass latent forward: every layout trains exactly like one rank.

Each case runs three Adam steps (gradient clipping on) with J drawn per step from {1, 2, 3}, over
the same global batch; losses, gradient norms, the first step's gradients and the final weights
must equal the single-rank run's within 1e-5 (fp32). Cases sharing a world size run in one set of
spawned ranks (see pipeline_cases.run_cases).
"""


import pytest
import torch

import pipeline_cases as pc
from multirank import run_on_ranks
from parallel_utils import max_rel_diff

TOL = 1e-5
LLAMA1, LLAMA2 = pc.tiny_cfg("llama", 1), pc.tiny_cfg("llama", 2)
GPT2, PYTHIA = pc.tiny_cfg("gpt2", 1), pc.tiny_cfg("gpt-neox", 1)
VANILLA = pc.tiny_cfg("llama", 0)
# Backpropagation through the last k passes only: the passes before run as a forward-only schedule.
LLAMA1_K2, LLAMA2_K1 = LLAMA1.replace(grad_passes=2), LLAMA2.replace(grad_passes=1)
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# The baselines (LLaMA: untied embeddings, so interpolated thoughts need the first stage's copy of
# the output layer; GPT-2: tied, the first stage has the weight already).
BASELINES = {m: pc.method_cfg(m) for m in pc.BASELINES}
INTERP, INTERP_GPT2 = BASELINES["interpolated"], pc.method_cfg("interpolated", "gpt2")
# Pondering with the residual mix: interpolated (the output layer mirrored) and carrying its input.
PONDER_RESIDUAL = pc.method_cfg("ponder").replace(ponder_residual=True)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pp_ckpt"))


@pytest.fixture(scope="module")
def interp_ckpts(tmp_path_factory):
    """Interpolated-thought checkpoints: one saved at PP=2, one at PP=1."""
    return {pp: str(tmp_path_factory.mktemp(f"interp_pp{pp}")) for pp in (1, 2)}


@pytest.fixture(scope="module")
def pp2(ckpt_dir, interp_ckpts):
    return run_on_ranks(pc.run_cases, 2, [
        *[(f"{m}-pp2", "train", (cfg, 1, 2)) for m, cfg in BASELINES.items()],
        *[(f"{m}-vpp2", "train", (cfg, 1, 2, 2)) for m, cfg in BASELINES.items()],
        ("interpolated-gpt2-pp2", "train", (INTERP_GPT2, 1, 2)),
        ("ponder-residual-vpp2", "train", (PONDER_RESIDUAL, 1, 2, 2)),
        ("interpolated-save", "save_and_eval", (INTERP, 1, 2, interp_ckpts[2])),
        ("llama-n1", "train", (LLAMA1, 1, 2)),
        ("llama-n2", "train", (LLAMA2, 1, 2)),
        ("gpt2-n1", "train", (GPT2, 1, 2)),
        ("llama-n1-vpp2", "train", (LLAMA1, 1, 2, 2)),
        ("llama-n1-k2", "train", (LLAMA1_K2, 1, 2)),
        ("llama-n2-k1-vpp2", "train", (LLAMA2_K1, 1, 2, 2)),
        ("vanilla-wiring", "train", (VANILLA, 1, 2)),
        ("vanilla-megatron-1f1b", "vanilla_1f1b", (VANILLA, 2)),
        ("save", "save_and_eval", (LLAMA1, 1, 2, ckpt_dir)),
    ])


@pytest.fixture(scope="module")
def single(pp2, ckpt_dir, interp_ckpts):
    # Runs after pp2 (which wrote the checkpoint this loads).
    return run_on_ranks(pc.run_cases, 1, [
        *[(m, "train", (cfg, 1, 1)) for m, cfg in BASELINES.items()],
        ("interpolated-gpt2", "train", (INTERP_GPT2, 1, 1)),
        ("ponder-residual", "train", (PONDER_RESIDUAL, 1, 1)),
        ("interpolated-load", "load_and_eval", (INTERP, 1, 1, interp_ckpts[2])),
        ("interpolated-logits-from-pp2-weights", "logits_from_weights",
         (INTERP, pp2[0]["interpolated-save"]["weights"])),
        ("interpolated-save", "save_and_eval", (INTERP, 1, 1, interp_ckpts[1])),
        ("llama-n1", "train", (LLAMA1, 1, 1)),
        ("llama-n2", "train", (LLAMA2, 1, 1)),
        ("gpt2-n1", "train", (GPT2, 1, 1)),
        ("llama-n1-k2", "train", (LLAMA1_K2, 1, 1)),
        ("llama-n2-k1", "train", (LLAMA2_K1, 1, 1)),
        ("vanilla", "train", (VANILLA, 1, 1)),
        ("load", "load_and_eval", (LLAMA1, 1, 1, ckpt_dir)),
        ("logits-from-pp2-weights", "logits_from_weights", (LLAMA1, pp2[0]["save"]["weights"])),
    ])[0]


def check(results, ref, tol=TOL, grads=True):
    losses = [r["losses"] for r in results if r["losses"] is not None]
    # The last pipeline stage (each of its tensor-parallel ranks) reports the loss.
    assert losses and len(losses) < len(results)
    for got in losses:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref["losses"]), rtol=tol, atol=0)
    for r in results:
        if "js" in r and "js" in ref:
            assert r["js"] == ref["js"]
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=tol, atol=0)
        if grads:
            assert max_rel_diff(r["grads"], ref["grads"]) < tol
        assert max_rel_diff(r["weights"], ref["weights"]) < tol


def test_reference_draws_different_j_per_step(single):
    # The pipeline is rebuilt per step: its number of virtual chunks changes with J.
    ref = single["llama-n1"]
    assert len(set(ref["js"])) > 1, ref["js"]


@pytest.mark.parametrize("case", ["llama-n1", "llama-n2", "gpt2-n1"])
def test_pp2_equals_single_rank(pp2, single, case):
    check([r[case] for r in pp2], single[case])


@pytest.mark.parametrize("case,ref", [("llama-n1-k2", "llama-n1-k2"), ("llama-n2-k1-vpp2", "llama-n2-k1")])
def test_pp2_with_fewer_grad_passes_equals_single_rank(pp2, single, case, ref):
    check([r[case] for r in pp2], single[ref])
    # Fewer passes backpropagated: other gradients than the full backpropagation's.
    full = single["llama-n1" if ref == "llama-n1-k2" else "llama-n2"]
    assert max_rel_diff(single[ref]["grads"], full["grads"]) > 1e-3


def test_pp2_combined_with_interleaved_layer_chunks(pp2, single):
    # 2 layer chunks per rank x P passes = 2P virtual chunks.
    check([r["llama-n1-vpp2"] for r in pp2], single["llama-n1"])


def test_n0_pipeline_equals_megatron_1f1b_and_single_rank(pp2, single):
    wiring = [r["vanilla-wiring"] for r in pp2]
    megatron = [r["vanilla-megatron-1f1b"] for r in pp2]
    # Gradients and weights are gathered whole on every rank; the loss lives on the last stage.
    ref = dict(megatron[0], losses=megatron[-1]["losses"])
    check(wiring, ref, tol=1e-6)
    check(wiring, single["vanilla"])


def _check_pp2_checkpoint_at_pp1(saved, loaded, logits_from_pp2_weights):
    # The checkpoint holds each weight once, under its global name: PP=1 gets the whole model.
    assert max_rel_diff(loaded["weights"], saved[0]["weights"]) == 0.0
    torch.testing.assert_close(loaded["logits"], logits_from_pp2_weights, rtol=0, atol=0)
    # Evaluation (forward only, J = jacobi_iters_eval) through the PP=2 schedule equals PP=1's.
    pp2_eval = [s["eval_loss"] for s in saved if s["eval_loss"] is not None]
    assert len(pp2_eval) == 1
    assert loaded["eval_loss"] == pytest.approx(pp2_eval[0], rel=1e-6)


def test_checkpoint_saved_at_pp2_loads_at_pp1(pp2, single):
    _check_pp2_checkpoint_at_pp1([r["save"] for r in pp2], single["load"], single["logits-from-pp2-weights"])


@pytest.fixture(scope="module")
def world4(single, interp_ckpts):
    # Runs after single (which wrote the PP=1 checkpoint this loads at PP=2).
    return run_on_ranks(pc.run_cases, 4, [
        *[(f"{m}-tp2-pp2-sp-recompute", "train", (cfg, 2, 2, None, pc.STEPS, True, RECOMPUTE))
          for m, cfg in BASELINES.items()],
        *[(f"{m}-dp2-pp2-distributed-optimizer", "train", (cfg, 1, 2, None, pc.STEPS, False, None, True))
          for m, cfg in BASELINES.items()],
        ("interpolated-load-pp2", "load_and_eval", (INTERP, 1, 2, interp_ckpts[1])),
        # megatron-LM's default: outputs are pseudo-freed once sent (needs view-free outputs).
        ("pp4", "train", (LLAMA1, 1, 4, None, pc.STEPS, False, {"deallocate_pipeline_outputs": True})),
        ("tp2-pp2-sp-recompute", "train", (LLAMA1, 2, 2, None, pc.STEPS, True, RECOMPUTE)),
        ("dp2-pp2", "train", (LLAMA1, 1, 2)),
        ("dp2-pp2-distributed-optimizer", "train", (LLAMA1, 1, 2, None, pc.STEPS, False, None, True)),
        ("k2-tp2-pp2-sp-recompute", "train", (LLAMA1_K2, 2, 2, None, pc.STEPS, True, RECOMPUTE)),
        ("k2-dp2-pp2", "train", (LLAMA1_K2, 1, 2)),
    ])


def test_pp4_equals_single_rank(world4, single):
    check([r["pp4"] for r in world4], single["llama-n1"])


def test_tp2_pp2_sequence_parallel_recompute_equals_single_rank(world4, single):
    check([r["tp2-pp2-sp-recompute"] for r in world4], single["llama-n1"])


def test_dp2_pp2_equals_single_rank(world4, single):
    check([r["dp2-pp2"] for r in world4], single["llama-n1"])


@pytest.mark.parametrize("case", ["k2-tp2-pp2-sp-recompute", "k2-dp2-pp2"])
def test_fewer_grad_passes_with_tp_sp_recompute_and_dp_equal_single_rank(world4, single, case):
    check([r[case] for r in world4], single["llama-n1-k2"])


def test_dp2_pp2_distributed_optimizer_equals_single_rank(world4, single):
    # Each rank's buffer holds the reduced gradient of its own shard only: compare the rest.
    check([r["dp2-pp2-distributed-optimizer"] for r in world4], single["llama-n1"], grads=False)


# ------------------------------------------------------------------------------------ baselines
@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_pp2_equals_single_rank(pp2, single, method):
    check([r[f"{method}-pp2"] for r in pp2], single[method])


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_pp2_with_interleaved_layer_chunks_equals_single_rank(pp2, single, method):
    check([r[f"{method}-vpp2"] for r in pp2], single[method])


def test_interpolated_pp2_with_tied_embeddings_equals_single_rank(pp2, single):
    check([r["interpolated-gpt2-pp2"] for r in pp2], single["interpolated-gpt2"])


def test_ponder_residual_pp2_with_interleaved_layer_chunks_equals_single_rank(pp2, single):
    check([r["ponder-residual-vpp2"] for r in pp2], single["ponder-residual"])


def test_baselines_train_differently(single):
    # The methods are told apart (and each from latent thoughts): the wiring cannot silently run
    # one method's passes for another's.
    losses = [single[m]["losses"][0] for m in BASELINES] + [single["llama-n1"]["losses"][0]]
    assert min(abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]) > 1e-4, losses


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_tp2_pp2_sequence_parallel_recompute_equals_single_rank(world4, single, method):
    check([r[f"{method}-tp2-pp2-sp-recompute"] for r in world4], single[method])


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_dp2_pp2_distributed_optimizer_equals_single_rank(world4, single, method):
    check([r[f"{method}-dp2-pp2-distributed-optimizer"] for r in world4], single[method], grads=False)


def test_interpolated_checkpoint_moves_between_pp2_and_pp1(pp2, single, world4):
    # Saved at PP=2 (the first stage's copy of the output layer is not saved), loaded at PP=1.
    _check_pp2_checkpoint_at_pp1([r["interpolated-save"] for r in pp2], single["interpolated-load"],
                                 single["interpolated-logits-from-pp2-weights"])
    # Saved at PP=1, loaded at PP=2 (x DP=2): the copy loads from the output layer (pc.merged
    # asserts it equals it exactly) and evaluation gives PP=1's loss.
    saved1 = single["interpolated-save"]
    loaded2 = [r["interpolated-load-pp2"] for r in world4]
    for r in loaded2:
        assert max_rel_diff(r["weights"], saved1["weights"]) == 0.0
    evals = [r["eval_loss"] for r in loaded2 if r["eval_loss"] is not None]
    assert len(evals) == 2  # the last stage of each data-parallel replica
    for e in evals:
        assert e == pytest.approx(saved1["eval_loss"], rel=1e-6)


def test_3d_tp2_pp2_dp2_equals_single_rank(single):
    results = run_on_ranks(pc.run_cases, 8, [
        ("3d", "train", (LLAMA1, 2, 2, None, pc.STEPS, True, RECOMPUTE)),
        ("3d-pythia", "train", (PYTHIA, 2, 2, None, pc.STEPS, True, RECOMPUTE)),
    ], timeout=900)
    check([r["3d"] for r in results], single["llama-n1"])
    ref = run_on_ranks(pc.train, 1, PYTHIA, 1, 1)[0]
    check([r["3d-pythia"] for r in results], ref)


# ------------------------------------------------------------------------------------ bad input
def test_microbatches_incompatible_with_the_schedule_name_the_fields():
    from megatron_latent.config import ConfigError, ParallelLayout

    pp2 = ParallelLayout(1, 2)
    pp2.check_schedule(4, 4)  # fine: a multiple of PP
    pp2.check_schedule(3, 1)  # one chunk (N=0): megatron's 1F1B takes any count
    for m in (1, 3, 5):
        with pytest.raises(ConfigError, match=rf"num_microbatches {m} per step.*pipeline_model_parallel_size 2"):
            pp2.check_schedule(m, 4)
    with pytest.raises(ConfigError, match="num_microbatches is 0"):
        ParallelLayout().check_schedule(0, 1)


def test_layers_not_divisible_over_stages_name_the_field():
    from megatron_latent.config import ConfigError, ParallelLayout

    cfg = pc.tiny_cfg("llama", 1, layers=6)
    ParallelLayout(1, 2).check_model(cfg)
    ParallelLayout(1, 3).check_model(cfg)
    with pytest.raises(ConfigError, match="num_layers 6 of model 'tiny-llama' is not divisible by "
                                          "pipeline_model_parallel_size 4"):
        ParallelLayout(1, 4).check_model(cfg)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size 2 x num_virtual_stages_per_pipeline_rank 2"):
        ParallelLayout(1, 2, 2).check_model(cfg)
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size 8 is larger than num_layers 6"):
        ParallelLayout(1, 8).check_model(cfg)
    with pytest.raises(ConfigError, match="needs pipeline_model_parallel_size > 1"):
        ParallelLayout(1, 1, 2)
    assert ParallelLayout(1, 2, 1).num_virtual_stages_per_pipeline_rank is None  # one chunk: the plain pipeline


def test_unsupported_settings_name_the_field():
    from types import SimpleNamespace

    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_latent.config import ConfigError, ParallelLayout
    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.pipeline import _check_ddp, check_stage_config

    config = to_transformer_config(LLAMA1, 2, 2, sequence_parallel=True)
    layout = ParallelLayout.of(config)
    assert layout == ParallelLayout(2, 2, None, sequence_parallel=True)
    layout.check_sequence_split(8)
    with pytest.raises(ConfigError, match="sequence length 9 is not divisible by tensor_model_parallel_size 2"):
        layout.check_sequence_split(9)
    with pytest.raises(ConfigError, match="context_parallel_size"):
        check_stage_config(SimpleNamespace(context_parallel_size=2))
    with pytest.raises(ConfigError, match="overlap_grad_reduce"):
        _check_ddp([SimpleNamespace(ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=True))])
    with pytest.raises(ConfigError, match="overlap_param_gather"):
        _check_ddp([SimpleNamespace(ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=False, overlap_param_gather=True))])


def _wrong_microbatches():
    """Every rank refuses a bad micro-batch count before any pipeline message is sent."""
    from megatron_latent.config import ConfigError
    from megatron_latent.training.engine import latent_train_step

    dp, model, opt = pc.setup(LLAMA1, 1, 2)
    batches = pc.step_batches(0, dp)[:3]
    try:
        latent_train_step(model, opt, iter(batches), 3, pc.L, pc.MBS, 2)
    except ConfigError as e:
        return str(e)
    return None


def test_bad_microbatch_count_fails_on_every_rank_without_hanging():
    msgs = run_on_ranks(_wrong_microbatches, 2, timeout=120)
    assert all(m is not None and "num_microbatches 3 per step" in m for m in msgs), msgs
