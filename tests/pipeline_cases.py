"""Rank bodies for the latent pipeline tests (module-level, so spawned ranks can import them)."""

from __future__ import annotations

from functools import partial

import torch

from parallel_utils import batch, gather_full, init_weights

L, MBS, GLOBAL_MICROBATCHES, STEPS = 8, 2, 4, 3
JACOBI_RANGE = (1, 3)


def tiny_cfg(arch="llama", n=1, layers=4, **overrides):
    from megatron_latent.config import LatentSettings, ModelConfig

    kw = dict(
        name=f"tiny-{arch}", arch=arch, num_layers=layers, hidden_size=32, num_attention_heads=4,
        ffn_hidden_size=64, vocab_size=64, make_vocab_size_divisible_by=32, seq_length=L,
        latent=LatentSettings(n, JACOBI_RANGE if n else None, jacobi_iters_eval=2, scale_embeddings=n > 0),
    )
    if arch == "llama":
        kw["num_query_groups"] = 2
    if arch == "gpt-neox":
        kw["rotary_percent"] = 0.5
    kw.update(overrides)
    return ModelConfig(**kw)


# LatentSettings keyword arguments of the baselines (K = 2 pause tokens / extra loops / pondering steps).
BASELINES = {
    "interpolated": dict(num_latent_thoughts=1, jacobi_iters=JACOBI_RANGE, thought_input="interpolated"),
    "pause": dict(num_pause_tokens=2),
    "loop": dict(num_extra_loops=2),
    # PonderLM: LLaMA's softmax mix (the first stage needs the output layer), and GPT-NeoX's
    # hidden feedback, whose hand-offs carry each pass's input.
    "ponder": dict(num_ponder_steps=2),
    "ponder-hidden": dict(num_ponder_steps=2, ponder_feedback="hidden"),
}


def method_cfg(method, arch="llama"):
    """tiny_cfg of a baseline method (embeddings scaled, the authors' setting)."""
    from megatron_latent.config import LatentSettings

    return tiny_cfg(arch, latent=LatentSettings(**BASELINES[method], jacobi_iters_eval=2))


def merged(model, grads):
    out = {}
    for chunk in model:
        out.update(gather_full(chunk, grads=grads))
    tied = "output_layer.weight" in out and "embedding.word_embeddings.weight" in out
    if tied and model[-1].module.share_embeddings_and_output_weights:
        # PP>1 with tied embeddings: the last stage's copy must track the first stage's weight.
        copy = out.pop("output_layer.weight")
        torch.testing.assert_close(copy, out["embedding.word_embeddings.weight"], rtol=1e-6, atol=1e-7)
    if "thought_head" in out:
        # PP>1, interpolated thoughts, untied: the first stage's copy of the output layer is the
        # output layer, exactly (same start, same gradient, same update).
        copy = out.pop("thought_head")
        torch.testing.assert_close(copy, out["output_layer.weight"], rtol=0, atol=0)
    return out


def setup(cfg, tp, pp, vpp=None, distributed_optimizer=False, **config_overrides):
    """Parallel state, this rank's DDP-wrapped stage(s) with layout-independent weights, optimizer."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.parallel.pipeline import build_latent_pipeline
    from megatron_latent.training import engine

    dp = initialize_model_parallel(tp, pp, model=cfg)
    config = to_transformer_config(cfg, tp, pp, vpp, **config_overrides)
    chunks = build_latent_pipeline(cfg, config)
    init_weights(chunks)
    model = engine.wrap_ddp(chunks, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer))
    opt = engine.build_optimizer(
        model,
        OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-3, clip_grad=1.0,
                        use_distributed_optimizer=distributed_optimizer),
    )
    engine.configure_model_for_training(model, opt)
    return dp, model, opt


def step_batches(step, dp, mbs=MBS, global_microbatches=GLOBAL_MICROBATCHES):
    from megatron.core import parallel_state as ps

    per_rank = global_microbatches // dp
    start = step * global_microbatches + ps.get_data_parallel_rank() * per_rank
    return [batch(start + i, mbs, L) for i in range(per_rank)]


def train(cfg, tp, pp, vpp=None, steps=STEPS, sequence_parallel=False, config_overrides=None,
          distributed_optimizer=False):
    """STEPS Adam steps with J drawn per step; losses, grad norms, first-step grads, final weights."""
    from megatron.core import parallel_state as ps

    from megatron_latent.training.engine import latent_train_step

    dp, model, opt = setup(cfg, tp, pp, vpp, distributed_optimizer, sequence_parallel=sequence_parallel,
                           **(config_overrides or {}))
    losses, norms, js, first = [], [], [], None
    for step in range(steps):
        j = cfg.latent.jacobi_iters_for_step(step, seed=0)
        batches = step_batches(step, dp)
        r = latent_train_step(model, opt, iter(batches), len(batches), L, MBS, j)
        losses.append(r.loss)
        norms.append(r.grad_norm)
        js.append(j)
        if step == 0:
            first = merged(model, grads=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return {"losses": losses if last else None, "norms": norms, "js": js, "grads": first,
            "weights": merged(model, grads=False)}


def vanilla_1f1b(cfg, pp):
    """megatron's own PP schedule on a plain GPTModel (N=0): the reference for the wiring at N=0."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.training import engine

    initialize_model_parallel(1, pp, model=cfg)
    chunks = [build_gpt_model(cfg, model_cls=GPTModel)]
    init_weights(chunks)
    model = engine.wrap_ddp(chunks, DistributedDataParallelConfig())
    from megatron.core.optimizer import OptimizerConfig

    opt = engine.build_optimizer(model, OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-3, clip_grad=1.0))
    engine.configure_model_for_training(model, opt)

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, partial(engine.token_loss, None)

    losses, norms, first = [], [], None
    for step in range(STEPS):
        batches = step_batches(step, 1)
        r = engine.train_step(forward_step, iter(batches), model, opt, len(batches), L, MBS)
        losses.append(r.loss)
        norms.append(r.grad_norm)
        if step == 0:
            first = merged(model, grads=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    return {"losses": losses if last else None, "norms": norms, "grads": first, "weights": merged(model, grads=False)}


def save_and_eval(cfg, tp, pp, root):
    """Train one step, evaluate (forward only, J = jacobi_iters_eval), save; return loss, weights."""
    from megatron_latent.training.checkpointing import save_checkpoint
    from megatron_latent.training.engine import latent_eval_loss, latent_train_step

    dp, model, opt = setup(cfg, tp, pp)
    batches = step_batches(0, dp)
    latent_train_step(model, opt, iter(batches), len(batches), L, MBS, 2)
    eval_batches = step_batches(5, dp)
    loss = latent_eval_loss(model, iter(eval_batches), len(eval_batches), L, MBS)
    save_checkpoint(root, 1, model)
    return {"eval_loss": loss, "weights": merged(model, grads=False)}


def load_and_eval(cfg, tp, pp, root):
    """Load into a fresh model at this layout; eval loss and full-vocabulary logits."""
    from megatron_latent.training.checkpointing import load_checkpoint
    from megatron_latent.training.engine import latent_eval_loss

    dp, model, opt = setup(cfg, tp, pp)
    load_checkpoint(root, model)
    eval_batches = step_batches(5, dp)
    loss = latent_eval_loss(model, iter(eval_batches), len(eval_batches), L, MBS)
    logits = None
    if pp == 1:  # a pipeline stage is not called directly
        m = model[0].module.eval()
        d = eval_batches[0]
        with torch.no_grad():
            logits = m(d["tokens"], d["position_ids"], None, runtime_gather_output=True)
    return {"eval_loss": loss, "weights": merged(model, grads=False), "logits": logits}


def logits_from_weights(cfg, weights):
    """Logits at PP=1 of a fresh model given full weights by global name (the reference for load)."""
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.parallel.pipeline import build_latent_pipeline

    initialize_model_parallel(1, 1, model=cfg)
    m = build_latent_pipeline(cfg)[0]
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(weights[name])
    m.eval()
    d = step_batches(5, 1)[0]
    with torch.no_grad():
        return m(d["tokens"], d["position_ids"], None, runtime_gather_output=True)


def run_cases(cases):
    """Run several (name, function, args) cases in one set of ranks: spawning and importing
    megatron costs more than a tiny model's steps."""
    import pipeline_cases

    return {name: getattr(pipeline_cases, fn)(*args) for name, fn, args in cases}
