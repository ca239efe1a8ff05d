"""Training entry point: `torchrun --nproc_per_node N -m megatron_latent.pretrain [flags]`.

A thin driver over the library: flags -> model config -> parallel state -> model, megatron DDP,
optimizer, scheduler -> resume -> data -> `training.loop.train`. Runs on CPU (gloo) or GPU (NCCL)
alike. Every configuration error is one line naming the flag, printed by rank 0, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch


def _error(msg: str, code: int = 2, printer: bool = None) -> int:
    """Print `msg` once (on rank 0 unless `printer` says whether this rank prints) and return the
    exit status."""
    import torch.distributed as dist

    if printer if printer is not None else (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"error: {msg}", file=sys.stderr)
    return code


def build_model(cfg, args):
    """This rank's stage module(s) (before DDP) of the latent model, any TP/PP/VPP layout."""
    from megatron.core import parallel_state as ps

    from megatron_latent.parallel.pipeline import build_latent_pipeline

    overrides = {}
    if args.sequence_parallel:
        overrides["sequence_parallel"] = True
    if args.recompute_granularity:
        overrides["recompute_granularity"] = args.recompute_granularity
        if args.recompute_granularity == "full":
            overrides.update(recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)
    config = cfg.to_transformer_config(
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        args.num_virtual_stages_per_pipeline_rank,
        # bf16 weights; the optimizer keeps fp32 main weights and losses are reduced in fp32.
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        **overrides,
    )
    return build_latent_pipeline(cfg, config)


def build_optimizer_and_scheduler(model, args):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_latent.training import engine

    opt = engine.build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
    )
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * args.train_iters)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        # Neither flag: a resumed run must have the checkpoint's schedule (loop.resume checks it).
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
    return opt, sched


def main(argv=None) -> int:
    import megatron_latent  # noqa: F401  (CPU backend when CUDA is absent)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_latent.config import ModelConfigError
    from megatron_latent.data.gpt_data import DataConfigError
    from megatron_latent.data.tokenizer import TokenizerError
    from megatron_latent.hf.convert import MODEL_CONFIG_FILE
    from megatron_latent.models.flops import latent_step_flops
    from megatron_latent.models.latent import LatentConfigError
    from megatron_latent.parallel.initialize import ParallelConfigError, initialize_model_parallel
    from megatron_latent.parallel.pipeline import (
        PipelineConfigError, pass_slots, validate_model_split, validate_schedule)
    from megatron_latent.training import batches as batching
    from megatron_latent.training import checkpointing, engine, loop
    from megatron_latent.training.arguments import model_config_from_args, parse_args
    from megatron_latent.training.metrics import MetricsWriter

    args = parse_args(argv)
    try:
        tokenizer = batching.build_tokenizer_from_args(args)
        cfg = model_config_from_args(args, tokenizer.vocab_size if tokenizer is not None else None)
        cfg.check_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    except (ModelConfigError, LatentConfigError, TokenizerError, FileNotFoundError) as e:
        return _error(str(e))
    seq_length = args.seq_length if args.seq_length is not None else cfg.seq_length
    try:
        dp = initialize_model_parallel(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.query_groups, seed=args.seed,
        )
    except ParallelConfigError as e:
        return _error(str(e))
    if args.global_batch_size % (args.micro_batch_size * dp):
        return _error(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                      f"{args.micro_batch_size} x data-parallel size {dp}")
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    # J of step s is drawn from (--seed, s) alone: every rank, and a resumed run, draws the same.
    latent = dataclasses.replace(cfg.latent_settings(), jacobi_seed=args.seed)
    try:
        # Every J the run can draw (and the evaluation J) must suit the pipeline schedule.
        validate_model_split(cfg, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                             args.num_virtual_stages_per_pipeline_rank or 1)
        lo, hi = latent.training_range
        for j in sorted(set(range(lo, hi + 1)) | {latent.jacobi_iters_eval if cfg.num_latent_thoughts else 0}):
            validate_schedule(num_micro, args.pipeline_model_parallel_size,
                              len(pass_slots(latent, j)) * (args.num_virtual_stages_per_pipeline_rank or 1))
    except (PipelineConfigError, ModelConfigError) as e:
        return _error(str(e))
    reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0)
    rank0 = torch.distributed.get_rank() == 0

    def log(msg):
        if reporter or rank0:
            print(msg, flush=True)

    model = engine.wrap_ddp(
        build_model(cfg, args),
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16, use_distributed_optimizer=args.use_distributed_optimizer,
        ),
    )
    opt, sched = build_optimizer_and_scheduler(model, args)
    engine.configure_model_for_training(model, opt)
    if rank0:
        print(f"model {cfg.name}: {cfg.arch}, {cfg.num_parameters():,} parameters, N={cfg.num_latent_thoughts} "
              f"latent thoughts | TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
              f"DP={dp} | {num_micro} micro-batches of {args.micro_batch_size} per step", flush=True)

    state = loop.TrainState()
    if args.load:
        try:
            state = loop.resume(
                args.load, cfg, model, opt, sched, finetune=args.finetune, load_optim=not args.no_load_optim,
                optimizer_layout={k: getattr(args, k) for k in (
                    "tensor_model_parallel_size", "pipeline_model_parallel_size", "use_distributed_optimizer",
                    "bf16", "num_virtual_stages_per_pipeline_rank")},
                log=log if rank0 else (lambda m: None))
        except (loop.ResumeError, ModelConfigError) as e:
            return _error(str(e))

    try:
        train_ds, valid_ds, test_ds = batching.build_datasets(
            args, tokenizer if tokenizer is not None else batching.MockTokenizer(cfg.vocab_size), seq_length,
            args.train_iters * args.global_batch_size, args.eval_iters * args.global_batch_size or None,
        )
    except DataConfigError as e:
        return _error(str(e))
    dp_rank = ps.get_data_parallel_rank()
    train_iter = batching.micro_batches(train_ds, state.consumed_train_samples, args.micro_batch_size,
                                        dp_rank, dp, args.num_workers)

    def eval_batches(ds, what):
        # The same samples at every evaluation, so the curve compares like with like; kept on the
        # host between evaluations.
        if not args.eval_iters or ds is None:
            return None
        return batching.take(batching.micro_batches(ds, 0, args.micro_batch_size, dp_rank, dp, on_device=False),
                             args.eval_iters * num_micro, what)

    valid_batches, test_batches = eval_batches(valid_ds, "validation"), eval_batches(test_ds, "test")
    if args.eval_iters and valid_batches is None:
        log("no validation data (the --split gives it no weight, or --valid-data-path is not given): "
            "no validation loss is reported")

    n = cfg.num_latent_thoughts

    def flops_per_sample(jacobi):
        return latent_step_flops(seq_length, n, jacobi or 0, cfg.padded_vocab_size, cfg.hidden_size,
                                 cfg.num_layers, cfg.ffn_hidden_size, cfg.num_attention_heads,
                                 cfg.query_groups, cfg.gated)

    def save(st):
        checkpointing.save_checkpoint(
            args.save, st.iteration, model, opt, sched,
            extra={"consumed_train_samples": st.consumed_train_samples, "model_config": cfg.to_dict(),
                   "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}},
            root_files={MODEL_CONFIG_FILE: json.dumps(cfg.to_dict(), indent=2)},
        )
        log(f"saved checkpoint of iteration {st.iteration} to {args.save}")

    if args.save:
        checkpointing.start_checkpoint_writer()  # before the loop's SIGTERM handler exists
    metrics = MetricsWriter(args.tensorboard_dir, reporter, start_iteration=state.iteration)
    try:
        loop.train(
            loop.LoopConfig(
                train_iters=args.train_iters, global_batch_size=args.global_batch_size,
                micro_batch_size=args.micro_batch_size, num_microbatches=num_micro, seq_length=seq_length,
                log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                save=args.save, load=args.load, save_interval=args.save_interval, exit_signal_handler=args.exit_signal_handler,
                exit_interval=args.exit_interval,
                flops_per_sample=flops_per_sample,
            ),
            state, model, opt, sched, train_iter, valid_batches, test_batches,
            jacobi_for_step=(lambda step: latent.jacobi_iters_for_step(step)) if n else (lambda step: None),
            jacobi_eval=latent.jacobi_iters_eval if n else None,
            save_fn=save, metrics=metrics, log=log, reporter=reporter,
        )
    except loop.TrainingDiverged as e:
        return _error(str(e), code=1, printer=reporter)  # every rank stops; the last stage knows the loss
    except checkpointing.CheckpointWriteError as e:
        return _error(str(e), code=1)
    finally:
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
