"""Training entry point: `python -m megatron_latent.pretrain [flags]` on one process, or
`torchrun --nproc_per_node N -m megatron_latent.pretrain [flags]` on several.

A thin driver over the library: `configure` (flags -> model config, parallel layout, micro-batches,
Jacobi draw, all checked) -> `build_trainer` (model, megatron DDP, optimizer, scheduler, resume,
data) -> `training.loop.train`. Runs on CPU (gloo) or GPU (NCCL) alike. Every configuration error
is one line naming the flag, exit status 2; messages are printed by one rank (see `_Console`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megatron_latent.checkpoint_layout import MODEL_CONFIG_FILE, model_config_text
from megatron_latent.config import ConfigError, ModelConfig, ParallelLayout
from megatron_latent.data.gpt_data import DataConfigError
from megatron_latent.data.tokenizer import TokenizerError
from megatron_latent.models.flops import model_step_flops
from megatron_latent.models.init import describe_init
from megatron_latent.models.specs import transformer_engine_available
from megatron_latent.models.transformer_config import to_transformer_config
from megatron_latent.parallel.initialize import destroy_process_group, initialize_model_parallel
from megatron_latent.parallel.pipeline import build_latent_pipeline
from megatron_latent.training import batches as batching
from megatron_latent.training import checkpointing, engine, loop, resume, schedule
from megatron_latent.training.arguments import flag_error, model_config_from_args, parse_args
from megatron_latent.training.downstream import DownstreamEvaluator
from megatron_latent.training.metrics import MetricsWriter, WandbRun
from megatron_latent.training.monitoring import Monitor, StepProfiler
from megatron_latent.training.rampup import BatchSizes

logger = logging.getLogger("megatron_latent.pretrain")  # not __name__: that is "__main__" under -m

# Bad flags, data or checkpoints found before the first step: one line naming the flag, exit status 2.
CONFIG_ERRORS = (ConfigError, TokenizerError, FileNotFoundError, DataConfigError, resume.ResumeError,
                 checkpointing.CheckpointError)
# MEGATRON_LATENT_DEBUG=1: these errors (and those that stop a run) raise with their traceback.
DEBUG = os.environ.get("MEGATRON_LATENT_DEBUG", "") not in ("", "0")


# ------------------------------------------------------------------------------ console
class _RankFilter(logging.Filter):
    """Lets records through on the printing rank only: global rank 0 until the parallel layout
    stands, then the rank that holds the reported loss (`_run` switches it)."""

    def __init__(self):
        super().__init__()
        self.prints = (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0

    def filter(self, record: logging.LogRecord) -> bool:
        return self.prints


class _Console(logging.Handler):
    """Info to sys.stdout, warnings and errors (prefixed "error: " ...) to sys.stderr, looked up at
    each record: tests and tools redirect them. The library's warnings name fields: shown as flags."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                if record.name != logger.name:  # the driver's own errors are translated where raised
                    msg = flag_error(ValueError(msg))
                stream, msg = sys.stderr, f"{record.levelname.lower()}: {msg}"
            else:
                stream = sys.stdout
            stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001  (logging's own convention)
            self.handleError(record)


def _setup_console() -> _RankFilter:
    """The package's messages on the console (replacing an earlier call's handler); returns the
    filter that decides which rank prints."""
    package = logging.getLogger("megatron_latent")
    for h in [h for h in package.handlers if isinstance(h, _Console)]:
        package.removeHandler(h)
    handler, rank_filter = _Console(logging.INFO), _RankFilter()
    handler.addFilter(rank_filter)
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    return rank_filter


def _error(msg: str, code: int = 2) -> int:
    logger.error(msg)
    return code


# ------------------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Plan:
    """What the flags decide before any model exists, every part of it checked."""

    cfg: ModelConfig
    layout: ParallelLayout
    tokenizer: Any  # None: --mock-data without --tokenizer-type
    seq_length: int
    data_parallel_size: int
    num_microbatches: int
    jacobi_iters_for_step: Callable[[int], Optional[int]]  # None without latent thoughts (vanilla, pause, loop)
    jacobi_iters_eval: Optional[int]
    batch_sizes: Optional[BatchSizes] = None  # each iteration's global batch (--rampup-batch-size)


def configure(args) -> Plan:
    """Flags -> tokenizer, model config and parallel layout (joined: megatron's groups exist
    afterwards), with every check that must pass before a model is built. Raises one of
    CONFIG_ERRORS; all ranks check the same numbers, so all stop together."""
    layout = ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            args.num_virtual_stages_per_pipeline_rank, args.sequence_parallel)
    if args.reset_attention_mask and transformer_engine_available():
        # megatron's TE attention takes attn_mask_type=causal and ignores a dense mask: documents
        # would silently attend across their resets.
        raise ConfigError(
            "reset_attention_mask is not supported with Transformer Engine attention (its fused kernels apply "
            "a plain causal mask, so documents would attend across resets); train without it, as Megatron-LM's "
            "GPT recipes do, or uninstall transformer_engine to use the local attention")
    for note in getattr(args, "megatron_notes", ()):
        logger.info(f"note: {note}")
    tokenizer = batching.build_tokenizer_from_args(args)
    cfg = model_config_from_args(args, tokenizer.vocab_size if tokenizer is not None else None)
    if args.weight_decay is None:
        args.weight_decay = cfg.latent.paper_weight_decay
    seq_length = args.seq_length if args.seq_length is not None else cfg.seq_length
    # The layout's checks, once, before any rendezvous (initialize_model_parallel gets no model).
    layout.check_model(cfg, seq_length)
    layout.check_recompute(cfg.num_layers, args.recompute_granularity, args.recompute_method,
                           args.recompute_num_layers)
    dp = initialize_model_parallel(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                                   layout.num_virtual_stages_per_pipeline_rank, seed=args.seed,
                                   timeout_minutes=args.distributed_timeout_minutes)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(
            f"global_batch_size {args.global_batch_size} is not divisible by micro_batch_size "
            f"{args.micro_batch_size} x data-parallel size {dp}")
    num_micro = args.global_batch_size // (args.micro_batch_size * dp)
    latent = cfg.latent
    # Every J the run can draw (and the evaluation J) must suit the pipeline schedule.
    for j in latent.jacobi_choices():
        layout.check_schedule(num_micro, len(latent.pass_slots(j)) * layout.virtual_chunks)
    batch_sizes = _check_rampup(args, layout, latent, dp)
    n = latent.num_latent_thoughts
    return Plan(
        cfg, layout, tokenizer, seq_length, dp, num_micro,
        # J of step s is drawn from (--seed, s) alone: every rank, and a resumed run, draws the same.
        jacobi_iters_for_step=(lambda step: latent.jacobi_iters_for_step(step, args.seed)) if n
        else (lambda step: None),
        jacobi_iters_eval=latent.jacobi_iters_eval if n else None, batch_sizes=batch_sizes,
    )


def _check_rampup(args, layout: ParallelLayout, latent, dp: int) -> Optional[BatchSizes]:
    """The batch sizes of --rampup-batch-size, each of its global batches checked as the full one
    is: whole micro-batches on every data-parallel rank, and a count the pipeline schedule takes
    at every J (megatron's calculator would stop at the first bad one mid-run)."""
    if args.rampup_batch_size is None:
        return None
    flag = f"--rampup-batch-size {' '.join(map(str, args.rampup_batch_size))}"
    per_step = args.micro_batch_size * dp
    for batch in BatchSizes(args.global_batch_size, rampup=args.rampup_batch_size).stages(args.train_samples):
        if batch % per_step:
            raise ConfigError(f"{flag}: its global batch {batch} is not divisible by --micro-batch-size "
                              f"{args.micro_batch_size} x data-parallel size {dp}")
        for j in latent.jacobi_choices():
            try:
                layout.check_schedule(batch // per_step, len(latent.pass_slots(j)) * layout.virtual_chunks)
            except ConfigError as e:
                why = str(e).split(": ", 1)[-1]
                m = batch // per_step
                raise ConfigError(f"{flag}: its global batch {batch} is {m} micro-batch{'es' * (m != 1)} per step, "
                                  f"but {why}") from None
    return BatchSizes(args.global_batch_size, args.micro_batch_size, dp, args.rampup_batch_size)


# ------------------------------------------------------------------------------ building
def build_model(cfg: ModelConfig, layout: ParallelLayout, args):
    """This rank's stage module(s) (before DDP) of the latent model, any TP/PP/VPP layout."""
    overrides = {"sequence_parallel": layout.sequence_parallel}
    if args.recompute_granularity:
        overrides["recompute_granularity"] = args.recompute_granularity
        if args.recompute_modules:
            overrides["recompute_modules"] = list(args.recompute_modules)
        if args.recompute_granularity == "full":
            overrides.update(recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)
    config = to_transformer_config(
        cfg,
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        layout.num_virtual_stages_per_pipeline_rank,
        # bf16 weights; the optimizer keeps fp32 main weights and losses are reduced in fp32.
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        **overrides,
    )
    return build_latent_pipeline(cfg, config)


def _model_settings(cfg: ModelConfig) -> str:
    """What is trained, resolved, in one line: the method's settings and the init."""
    return f"{cfg.describe()}; {describe_init(cfg)}"


def build_optimizer_and_scheduler(model, args):
    opt = engine.build_optimizer(
        model,
        OptimizerConfig(
            optimizer=args.optimizer, sgd_momentum=args.sgd_momentum, lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, decoupled_lr=args.decoupled_lr, decoupled_min_lr=args.decoupled_min_lr,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
    )
    sched = schedule.build_scheduler(opt, args)
    return opt, sched


def build_trainer(args, plan: Plan, reporter: bool) -> loop.Trainer:
    """Model, DDP, optimizer and scheduler, the resumed state, the data and the checkpoint writer."""
    cfg, dp = plan.cfg, plan.data_parallel_size
    chunks = build_model(cfg, plan.layout, args)
    if args.data_parallel_random_init:
        # Megatron-LM's seed per data-parallel rank; the weights, drawn whole from the common seed
        # before, are already data-parallel rank 0's (Megatron-LM broadcasts them).
        dp_seed = args.seed + 10 * ps.get_data_parallel_rank()
        torch.manual_seed(dp_seed)
        tensor_parallel.model_parallel_cuda_manual_seed(dp_seed)
    model = engine.wrap_ddp(
        chunks,
        DistributedDataParallelConfig(grad_reduce_in_fp32=args.bf16 and not args.grad_reduce_in_bf16,
                                      use_distributed_optimizer=args.use_distributed_optimizer),
    )
    opt, sched = build_optimizer_and_scheduler(model, args)
    engine.configure_model_for_training(model, opt)
    logger.info(f"model {cfg.name}: {cfg.arch}, {cfg.num_parameters():,} parameters, "
                f"method {cfg.latent.label} | TP={args.tensor_model_parallel_size} "
                f"PP={args.pipeline_model_parallel_size} DP={dp} | {plan.num_microbatches} micro-batches of "
                f"{args.micro_batch_size} per step"
                + (f" (after a rampup from a global batch of {args.rampup_batch_size[0]})" if plan.batch_sizes
                   else ""))
    logger.info(f"architecture: {cfg.describe_architecture()}")
    logger.info(f"model settings: {_model_settings(cfg)}")
    state = resume.TrainState()
    if args.load:
        state = resume.resume(
            args.load, cfg, model, opt, sched, finetune=args.finetune, load_optim=not args.no_load_optim,
            optimizer_layout={k: getattr(args, k) for k in (
                "tensor_model_parallel_size", "pipeline_model_parallel_size", "use_distributed_optimizer",
                "bf16", "num_virtual_stages_per_pipeline_rank")},
            schedule_flags={k: getattr(args, k) for k in schedule.UNSTORED})
    if args.save:
        checkpointing.check_save_dir(args.save, state.iteration, resumed_here=bool(
            args.load and not args.finetune and os.path.realpath(args.load) == os.path.realpath(args.save)))

    train_ds, valid_ds, test_ds = batching.build_datasets(
        args, plan.tokenizer if plan.tokenizer is not None else batching.MockTokenizer(cfg.vocab_size),
        plan.seq_length, args.train_iters * args.global_batch_size, args.eval_iters * args.global_batch_size or None,
    )
    dp_rank = ps.get_data_parallel_rank()

    def eval_batches(ds, what):
        # The same samples at every evaluation, so the curve compares like with like; kept on the
        # host between evaluations.
        if not args.eval_iters or ds is None:
            return None
        return batching.take(batching.micro_batches(ds, 0, args.micro_batch_size, dp_rank, dp, on_device=False,
                                                    vocab_size=cfg.vocab_size),
                             args.eval_iters * plan.num_microbatches, what)

    valid_batches = eval_batches(valid_ds, "validation")
    if args.eval_iters and valid_batches is None:
        logger.info("no validation data (the --split gives it no weight, or --valid-data-path is not given): "
                    "no validation loss is reported")

    background_saves = checkpointing.BackgroundSaves() if args.async_save else None

    def save(st: resume.TrainState) -> None:
        checkpointing.save_checkpoint(
            args.save, st.iteration, model, opt, sched,
            extra={"consumed_train_samples": st.consumed_train_samples, "model_config": cfg.to_dict(),
                   "args": {k: v for k, v in vars(args).items()
                            if isinstance(v, (int, float, str, bool, list, type(None)))}},
            root_files={MODEL_CONFIG_FILE: model_config_text(cfg)},
            retention=checkpointing.Retention(args.keep_last_n_checkpoints, args.save_retain_interval,
                                              frozenset(args.extra_save_iters or ())),
            background=background_saves,
        )
        logger.info(f"{'saving' if background_saves else 'saved'} checkpoint of iteration {st.iteration} to "
                    f"{args.save}" + (" in the background" if background_saves else ""))

    def flops_per_sample(jacobi):
        return model_step_flops(cfg, plan.seq_length, jacobi or 0)

    if args.save:
        checkpointing.start_checkpoint_writer()  # before the loop's SIGTERM handler exists
    return loop.Trainer(
        settings=loop.LoopConfig(
            train_iters=args.train_iters, global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size, num_microbatches=plan.num_microbatches,
            batch_sizes=plan.batch_sizes,
            seq_length=plan.seq_length, log_interval=args.log_interval, eval_interval=args.eval_interval,
            eval_iters=args.eval_iters, save=args.save, load=args.load, save_interval=args.save_interval,
            exit_signal_handler=args.exit_signal_handler, exit_interval=args.exit_interval,
            exit_duration_in_mins=args.exit_duration_in_mins,
            flops_per_sample=flops_per_sample, extra_save_iters=frozenset(args.extra_save_iters or ()),
        ),
        model=model, optimizer=opt, scheduler=sched,
        train_batches=batching.micro_batches(train_ds, state.consumed_train_samples, args.micro_batch_size,
                                             dp_rank, dp, args.num_workers, vocab_size=cfg.vocab_size),
        valid_batches=valid_batches, test_batches=eval_batches(test_ds, "test"),
        jacobi_iters_for_step=plan.jacobi_iters_for_step, jacobi_iters_eval=plan.jacobi_iters_eval, save=save,
        background_saves=background_saves,
        metrics=MetricsWriter(args.tensorboard_dir, reporter, start_iteration=state.iteration,
                              wandb=_open_wandb(args, plan) if reporter and args.wandb_project else None),
        reporter=reporter, state=state, monitor=_monitor(args, cfg),
        jacobi_iters_eval_sweep=_jacobi_iters_eval_sweep(args, plan),
        downstream=DownstreamEvaluator(
            args.save, args.eval_tasks, args.tokenizer_model, args.eval_tasks_limit,
            "cuda" if torch.cuda.is_available() else "cpu", args.eval_tasks_batch_size,
        ) if args.eval_tasks and reporter else None,
        downstream_interval=args.eval_tasks_interval,
    )


def _monitor(args, cfg: ModelConfig) -> Monitor:
    rank = dist.get_rank() if dist.is_initialized() else 0
    profiler = (StepProfiler(args.tensorboard_dir, args.profile_step_start, args.profile_step_end)
                if args.profile and rank in args.profile_ranks else None)
    stats = args.log_thought_stats and cfg.latent.method in ("latent", "interpolated", "loop")
    return Monitor(args.log_params_norm, args.log_memory_to_tensorboard, profiler, stats)


def _jacobi_iters_eval_sweep(args, plan: Plan) -> tuple:
    """The J of --jacobi-iters-eval-sweep (default 0, 1 and twice the evaluation J), the evaluation
    J itself left out (valid/loss is that one); each must suit the pipeline schedule."""
    if plan.jacobi_iters_eval is None or not args.eval_iters:
        return ()
    given = args.jacobi_iters_eval_sweep
    wanted = given if given is not None else [0, 1, 2 * plan.jacobi_iters_eval]
    sweep = []
    for j in sorted(set(wanted) - {plan.jacobi_iters_eval}):
        passes = len(plan.cfg.latent.pass_slots(j)) * plan.layout.virtual_chunks
        try:
            if j < 0:
                raise ConfigError(f"J must be >= 0, got {j}")
            plan.layout.check_schedule(plan.num_microbatches, passes)
        except ConfigError as e:
            if given is not None:
                raise ConfigError(f"--jacobi-iters-eval-sweep {j}: {e}") from None
            continue  # a default J this pipeline cannot run
        sweep.append(j)
    return tuple(sweep)


def _open_wandb(args, plan: Plan) -> Optional[WandbRun]:
    """The W&B run (resumed when --save holds its id), its config the run's resolved settings; a
    W&B that cannot start (no login, no network) is one warning and the run goes on without it."""
    layout = plan.layout
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    config.update(model=f"{plan.cfg.name}: {plan.cfg.arch}", model_settings=_model_settings(plan.cfg),
                  method=plan.cfg.latent.label,
                  parameters=plan.cfg.num_parameters(), data_parallel_size=plan.data_parallel_size,
                  layout=f"TP={layout.tensor_model_parallel_size} PP={layout.pipeline_model_parallel_size} "
                         f"DP={plan.data_parallel_size} VPP={layout.num_virtual_stages_per_pipeline_rank or 1}")
    save_dir = args.wandb_save_dir or os.path.join(args.save, "wandb")
    try:
        return WandbRun(args.wandb_project, save_dir, args.save or save_dir, args.wandb_exp_name,
                        args.wandb_entity, config)
    except Exception as e:  # noqa: BLE001  (whatever W&B raises, training need not stop)
        logger.warning(f"--wandb-project: W&B did not start ({type(e).__name__}: {e}); training goes on without it")
        return None


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    console = _setup_console()
    joins = not dist.is_initialized()  # else the caller's process group, left as it is
    try:
        return _run(args, console)
    finally:
        if joins:
            destroy_process_group()


def _run(args, console: _RankFilter) -> int:
    try:
        plan = configure(args)
        # The loss lives on the last pipeline stage: one of its ranks reports, and prints from now on.
        reporter = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                    and ps.get_data_parallel_rank() == 0)
        console.prints = reporter
        trainer = build_trainer(args, plan, reporter)
    except CONFIG_ERRORS as e:
        if DEBUG:
            raise
        return _error(flag_error(e))
    try:
        loop.train(trainer)
    except (loop.TrainingDiverged, checkpointing.CheckpointWriteError, DataConfigError) as e:
        if DEBUG:
            raise
        return _error(flag_error(e), code=1)  # raised on every rank
    finally:
        trainer.metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
