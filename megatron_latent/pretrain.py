"""Training entry point: `torchrun --nproc_per_node N -m megatron_latent.pretrain [flags]`.

A thin driver over `megatron_latent.training`: flags -> parallel state -> model -> megatron DDP
and optimizer -> steps. Runs on CPU (gloo) or GPU (NCCL) alike.
"""

from __future__ import annotations

import sys
import time

import torch


def _model(args, latent):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_latent.models.latent import LatentGPTModel, paper_init_methods
    from megatron_latent.models.norms import with_torch_norms

    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        batch_p2p_comm=torch.cuda.is_available(),
        **paper_init_methods(args.hidden_size, args.num_layers, args.num_latent_thoughts),
    )
    return LatentGPTModel(
        config=config,
        transformer_layer_spec=with_torch_norms(get_gpt_layer_local_spec(), args.num_layers),
        vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
        latent=latent,
    )


def _mock_batches(args, step, micro_batches, dp_rank, jacobi):
    """A learnable synthetic stream: each sequence counts up by a random stride mod vocab."""
    out = []
    for m in range(micro_batches):
        g = torch.Generator().manual_seed(args.seed + 7919 * step + 104729 * dp_rank + m)
        start = torch.randint(0, args.vocab_size, (args.micro_batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (args.micro_batch_size, 1), generator=g)
        seq = (start + stride * torch.arange(args.seq_length + 1)) % args.vocab_size
        out.append(
            {
                "tokens": seq[:, :-1],
                "labels": seq[:, 1:],
                "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1),
                "jacobi": jacobi,
            }
        )
    return out


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"], num_jacobi_iters=b["jacobi"])

    def loss_func(per_token):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def main(argv=None) -> int:
    import megatron_latent  # noqa: F401  (CPU backend when CUDA is absent)
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_latent.models.latent import LatentConfigError, LatentSettings
    from megatron_latent.parallel.initialize import ParallelConfigError, initialize_model_parallel
    from megatron_latent.training import engine
    from megatron_latent.training.arguments import parse_args

    args = parse_args(argv)
    try:
        latent = LatentSettings(
            args.num_latent_thoughts,
            tuple(args.jacobi_iters) if args.jacobi_iters else None,
            args.jacobi_iters_eval,
            args.scale_embeddings,
            jacobi_seed=args.seed,
        )
    except LatentConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        dp = initialize_model_parallel(
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            num_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads,
            seed=args.seed,
        )
    except ParallelConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        print(
            f"error: --global-batch-size {args.global_batch_size} is not divisible by "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}",
            file=sys.stderr,
        )
        return 2
    micro_batches = args.global_batch_size // (args.micro_batch_size * dp)

    model = engine.wrap_ddp([_model(args, latent)])
    opt = engine.build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            clip_grad=args.clip_grad,
        ),
    )
    warmup = int(args.lr_warmup_fraction * args.train_iters)
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=args.train_iters,
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    engine.configure_model_for_training(model, opt)
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    tokens_per_step = args.global_batch_size * args.seq_length
    for it in range(1, args.train_iters + 1):
        t0 = time.perf_counter()
        # J is drawn once per step, from (seed, step) alone: the same on every rank.
        jacobi = latent.jacobi_iters_for_step(it) if latent.num_latent_thoughts else None
        batches = _mock_batches(args, it, micro_batches, ps.get_data_parallel_rank(), jacobi)
        result = engine.train_step(
            _forward_step, iter(batches), model, opt, micro_batches, args.seq_length, args.micro_batch_size
        )
        sched.step(increment=1)
        dt = time.perf_counter() - t0
        if reporter and it % args.log_interval == 0:
            print(
                f"iteration {it:5d}/{args.train_iters} | loss {result.loss:.4f} | "
                + (f"J {jacobi} | " if jacobi is not None else "")
                + f"lr {opt.param_groups[0]['lr']:.3e} | grad norm {result.grad_norm:.3f} | "
                f"{tokens_per_step / dt:,.0f} tokens/s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
