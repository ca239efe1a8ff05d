"""The latent model for every architecture family (built through presets / build_gpt_model, with
the HF-mapped weights): it reaches the exact sequential rollout, N=0 is the vanilla GPTModel, and
TP=2 (also with sequence parallelism) equals one rank in loss and every gradient."""

import pytest
import torch

from hf_tiny import hf_model, tokens
from multirank import run_on_ranks

ARCHS = ["gpt2", "gpt-neox", "llama", "llama3", "qwen2", "qwen3"]  # hf_tiny names


def _model(arch, tp=1, sp=False, **latent):
    """A LatentGPTModel of `arch` at this rank's TP layout, holding the tiny HF model's weights."""
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.hf.mapping import hf_to_megatron
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.models.transformer_config import to_transformer_config

    hf = hf_model(arch)
    cfg, full = hf_to_megatron(hf.state_dict(), hf.config)
    cfg = cfg.replace(**latent)
    config = to_transformer_config(cfg, tp, 1, sequence_parallel=sp)
    model = build_gpt_model(cfg, config=config, model_cls=LatentGPTModel, latent=cfg.latent)
    load_full_into_model(model, full, cfg)
    return cfg, model


def _positions(ids):
    return torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_jacobi_reaches_the_sequential_rollout(arch, single_rank):
    from megatron_latent.inference.reference import sequential_logits

    n, length = 2, 6
    _, model = _model(arch, num_latent_thoughts=n, scale_embeddings=True)
    model.eval()
    ids = tokens(2, length)
    with torch.no_grad():
        parallel = model(ids, _positions(ids), None, num_jacobi_iters=length * n)
        few = model(ids, _positions(ids), None, num_jacobi_iters=1)
    exact = sequential_logits(model, ids, _positions(ids))
    scale = exact.abs().max()
    assert ((parallel - exact).abs().max() / scale).item() < 1e-5
    assert ((few - exact).abs().max() / scale).item() > 1e-3  # the check can fail


@pytest.mark.parametrize("arch", ARCHS)
def test_no_thoughts_is_the_vanilla_model(arch, single_rank):
    from megatron_latent.hf.layout import load_full_into_model
    from megatron_latent.hf.mapping import hf_to_megatron
    from megatron_latent.models.gpt import build_gpt_model

    cfg, latent = _model(arch, num_latent_thoughts=0)
    hf = hf_model(arch)
    _, full = hf_to_megatron(hf.state_dict(), hf.config)
    vanilla = build_gpt_model(cfg)
    load_full_into_model(vanilla, full, cfg)
    ids = tokens(2, 12)
    labels = torch.roll(ids, -1, 1)
    a = latent(ids, _positions(ids), None, labels=labels)
    b = vanilla(ids, _positions(ids), None, labels=labels)
    assert torch.equal(a, b)
    a.mean().backward()
    b.mean().backward()
    for (name, p), q in zip(latent.named_parameters(), vanilla.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert latent.state_dict().keys() == vanilla.state_dict().keys()


def test_input_longer_than_the_positions_is_refused(single_rank):
    cfg, model = _model("gpt2", num_latent_thoughts=1)
    ids = torch.zeros(1, cfg.seq_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model's 32 positions"):
        model(ids, _positions(ids), None, num_jacobi_iters=1)


def _loss_and_grads(tp, layouts):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_latent.hf.layout import merge_tp_pp
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    out = {}
    for arch in ARCHS:
        for sp in layouts:
            cfg, model = _model(arch, tp, sp, num_latent_thoughts=1, scale_embeddings=True)
            ids = tokens(2, 12)
            loss = model(ids, _positions(ids), None, labels=torch.roll(ids, -1, 1), num_jacobi_iters=2).mean()
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():
                g = p.grad.detach().clone()
                if (sp and getattr(p, "sequence_parallel", False)) or "q_layernorm" in name or "k_layernorm" in name:
                    # each rank saw part of the sequence, or (q/k norms) its own heads: megatron's
                    # finalize_model_grads sums these over the tensor-parallel ranks
                    dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
                grads[name] = g
            shards = [None] * tp
            dist.all_gather_object(shards, grads, group=ps.get_tensor_model_parallel_group())
            out[(arch, sp)] = (loss.item(), merge_tp_pp([shards], cfg))
    return out


def test_tensor_and_sequence_parallel_equal_one_rank():
    ref = run_on_ranks(_loss_and_grads, 1, 1, [False])[0]
    for got in run_on_ranks(_loss_and_grads, 2, 2, [False, True]):
        for (arch, sp), (loss, grads) in got.items():
            ref_loss, ref_grads = ref[(arch, False)]
            assert loss == pytest.approx(ref_loss, rel=1e-6), (arch, sp)
            for name, g in ref_grads.items():
                err = ((grads[name] - g).abs().max() / (g.abs().max() + 1e-12)).item()
                assert err < 1e-5, (arch, sp, name, err)
