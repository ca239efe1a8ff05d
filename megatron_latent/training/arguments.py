"""Command-line flags of the training driver, named as Megatron-LM names them (plus this project's
own), and their translation into the library's configuration objects."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from megatron_latent.cli import flag_message
from megatron_latent.config import ConfigError, ModelConfig, get_preset
from megatron_latent.config.latent import METHOD_SIZE_FIELDS
from megatron_latent.training import megatron_flags
from megatron_latent.training.checkpointing import checkpoint_model_config, resolve_iteration
from megatron_latent.training.rampup import BatchSizes, rampup_error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_latent.pretrain",
        description="Pretrain a GPT (optionally with latent thoughts) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group(
        "model (Megatron-LM's architecture flags; without --model-preset they describe the whole model, with "
        "Megatron-LM's defaults for the rest; with one, they replace the preset's fields)")
    g.add_argument("--model-preset", default=None,
                   help="architecture and sizes; `python -m megatron_latent.config` lists the presets")
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--max-position-embeddings", "--make-vocab-size-divisible-by", "--kv-channels"):
        g.add_argument(flag, type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None, help="with --group-query-attention (default 1)")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default=None, help="default LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=None, help="default 1e-5")
    g.add_argument("--apply-layernorm-1p", action="store_true", help="norms scale by 1 + weight (weight from 0)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (default GeLU)")
    g.add_argument("--squared-relu", action="store_true", help="squared-ReLU MLP (default GeLU)")
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope", "none"), default=None,
                   help="default learned_absolute")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="= --position-embedding-type rope")
    g.add_argument("--rotary-percent", type=float, default=None, help="default 1.0")
    g.add_argument("--rotary-base", type=float, default=None, help="default 10000")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.x rope scaling (HF's llama3 type: low/high frequency factors 1 and 4, 8192 "
                        "original positions)")
    g.add_argument("--rope-scaling-factor", type=float, default=None, help="default 8.0")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    g.add_argument("--add-qkv-bias", action="store_true", help="a bias in the qkv projection (even without others)")
    g.add_argument("--qk-layernorm", action="store_true", help="norm each head's queries and keys")
    g.add_argument("--hidden-dropout", type=float, default=None, help="default 0.1")
    g.add_argument("--attention-dropout", type=float, default=None, help="default 0.1")
    g.add_argument("--init-method-std", type=float, default=None,
                   help="Megatron-LM's init: normal(0, std), the output projections std / sqrt(2 x layers); "
                        "default 0.02 without a preset, the paper's init (docs/architectures.md) with one")
    g.add_argument("--init-style", choices=("paper", "megatron", "hf"), default=None,
                   help="the paper's init, Megatron-LM's, or the stock Hugging Face init of the family (as the "
                        "paper's vanilla baselines had: --init-style hf --init-method-std 0.02)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="training sequence length in tokens (default: --max-position-embeddings)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size for --mock-data without a tokenizer (default: the preset's; needed without "
                        "one)")

    g = p.add_argument_group("latent thoughts")
    g.add_argument("--num-latent-thoughts", type=int, default=None,
                   help="N thoughts per token (0 = vanilla GPT; default 0, or the checkpoint's with "
                        "--use-checkpoint-args, as for every latent flag)")
    g.add_argument("--jacobi-iters", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="inclusive range J is drawn from per training step (default: the authors' for the "
                        "family: 2 4 for gpt-neox, 2 3 for llama and gpt2)")
    g.add_argument("--jacobi-iters-eval", type=int, default=None, help="J of evaluation forwards (default 3)")
    g.add_argument("--jacobi-grad-passes", type=int, default=None, metavar="K",
                   help="backpropagate through the last K passes of a step only (the final pass counted); the "
                        "passes before run without a graph (default: all passes, the paper's)")
    g.add_argument("--scale-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="scale token embeddings by sqrt(c H), c = 2.5 for latent thoughts and loops, 1 for pause "
                        "tokens, interpolated thoughts and PonderLM (default: on with any method but GPT-NeoX's "
                        "PonderLM, as the authors' code)")
    g.add_argument("--thought-input", choices=("hidden", "interpolated"), default=None,
                   help="what a thought is fed: the hidden state (PonderLM-2) or the embeddings mixed by its output "
                        "softmax (interpolated: PonderLM-2 with interpolated thoughts); default hidden")
    g.add_argument("--interpolation-topk", type=int, default=None, metavar="K",
                   help="interpolated thoughts mix the K likeliest tokens only (0 = the full softmax; default 0)")

    g = p.add_argument_group("baselines (each exclusive with latent thoughts and with each other)")
    g.add_argument("--num-pause-tokens", type=int, default=None, metavar="K",
                   help="K pause tokens after every token, one pass, predicting at the last (default 0)")
    g.add_argument("--num-extra-loops", type=int, default=None, metavar="K",
                   help="run the layer stack K+1 times with shared weights, the final norm once (default 0)")
    g.add_argument("--num-ponder-steps", type=int, default=None, metavar="K",
                   help="PonderLM: K+1 forwards, each feeding the next (default 0)")
    g.add_argument("--ponder-feedback", choices=("interpolated", "hidden"), default=None,
                   help="what a pondering step adds: the embeddings mixed by the output softmax, or the hidden "
                        "state (default: the authors' for the family: hidden for gpt-neox, else interpolated)")
    g.add_argument("--ponder-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="add the interpolated mix to the current input instead of the token embedding "
                        "(their residual_interpolated_embeds; default off)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleave each rank's layers as this many virtual chunks (with the latent passes)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of the process groups' collectives")
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recomputation of core attention (= --recompute-granularity selective)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--recompute-modules", nargs="+", choices=("core_attn", "mlp", "layernorm"), default=None,
                   help="what selective recomputation reruns (default core_attn)")
    g.add_argument("--data-parallel-random-init", action="store_true",
                   help="each data-parallel rank its own dropout stream (seed + 10 x its rank); the weights are "
                        "data-parallel rank 0's, as in Megatron-LM")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights and activations (fp32 main params in the optimizer)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (default fp32)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=None, help="default 20 (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train this many samples (instead of --train-iters); the schedule then counts samples")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT to --global-batch-size over the first SAMPLES "
                        "samples (with --train-samples)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant", "inverse-square-root", "WSD"),
                   default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations of warmup and decay, the lr at --min-lr after them (default: --train-iters)")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="as --lr-decay-iters, with --train-samples")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the decay length, --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="as --lr-warmup-iters, with --train-samples")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the lr warmup starts from")
    g.add_argument("--lr-wsd-decay-style", choices=("exponential", "linear", "cosine", "minus_sqrt"),
                   default="exponential", help="the final decay of --lr-decay-style WSD")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="length of WSD's final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="as --lr-wsd-decay-iters, in samples")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="a separate peak lr for the input embedding and the output layer (their own optimizer "
                        "parameter group, on the same schedule)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="with --decoupled-lr: the embedding and output layer's --min-lr (default --min-lr)")

    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: the authors' script for the method, 0.01 for --num-ponder-steps, else 0.1")
    g.add_argument("--weight-decay-incr-style", choices=("constant", "linear", "cosine"), default="constant",
                   help="weight decay from --start-weight-decay to --end-weight-decay over training (constant: "
                        "--weight-decay)")
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000, help="validation loss every this many steps")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches per validation (and of the test loss at the end); 0: no evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None,
                   help="metrics.jsonl (always) and TensorBoard events (when tensorboard is installed) here")
    _add_monitoring_flags(p)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints (and one at the end)")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint here (none there: start fresh)")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only: iteration, data position, optimizer and scheduler start fresh")
    g.add_argument("--no-load-optim", action="store_true",
                   help="resume iteration, data position and weights, but start the optimizer state (Adam "
                        "moments) fresh; the lr schedule continues at the resumed iteration")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, follow the flags' lr schedule (--lr, --min-lr, warmup, --train-iters, ...) "
                        "rather than the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's lr schedule whatever the flags say (neither flag: "
                        "a different schedule is an error)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (saving a checkpoint when --save is given) at the first iteration that is a "
                        "multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving a checkpoint when --save is given) after the first step that ends this many "
                        "minutes into training (all ranks agree)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model (architecture and sizes) from the latest checkpoint in --load")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, save a checkpoint at the end of the current step and exit")

    g = p.add_argument_group("checkpoint retention and schedule (docs/checkpoints.md)")
    g.add_argument("--keep-last-n-checkpoints", type=int, default=None, metavar="K",
                   help="after each save, delete all but the newest K iterations in --save (besides those kept by "
                        "--save-retain-interval and --extra-save-iters); default: keep all")
    g.add_argument("--save-retain-interval", type=int, default=None, metavar="R",
                   help="keep every checkpoint at a multiple of R; the others but the newest (or the newest "
                        "--keep-last-n-checkpoints) are deleted after each save")
    g.add_argument("--extra-save-iters", type=int, nargs="+", default=None, metavar="I",
                   help="also save at these iterations (0: the initial weights, before the first step); never "
                        "deleted by retention")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background while training goes on; the iteration is published "
                        "once every rank has written it (the next save and every exit wait for it)")

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="megatron's synthetic, learnable token stream")
    g.add_argument("--data-path", nargs="+", default=None, help="PREFIX or WEIGHT PREFIX WEIGHT PREFIX ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--train-data-path", nargs="+", default=None)
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--test-data-path", nargs="+", default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument("--tokenizer-type", default=None,
                   help="HuggingFaceTokenizer, SentencePieceTokenizer or GPT2BPETokenizer (NullTokenizer: "
                        "--mock-data's ids)")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read the .bin data files instead of memory-mapping them")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD")
    g.add_argument("--reset-attention-mask", action="store_true", help="no attention across EOD")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting the token after EOD")
    megatron_flags.add_to_parser(p)
    return p


def _add_monitoring_flags(p: argparse.ArgumentParser) -> None:
    """Weights & Biases, Megatron's diagnostics and the thoughts' signals (docs/monitoring.md)."""
    g = p.add_argument_group("monitoring (docs/monitoring.md)")
    g.add_argument("--wandb-project", default=None, help="log every metric to this Weights & Biases project "
                   "(needs the wandb package: pip install 'megatron-latent[wandb]')")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add_argument("--wandb-save-dir", default=None, help="W&B's local files (default: --save/wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B team or user (default: yours)")
    g.add_argument("--log-params-norm", action="store_true", help="log the norm of the weights")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="log memory: peak resident memory on CPU, allocated and max allocated on GPU")
    g.add_argument("--log-throughput", action="store_true", help="accepted: throughput is always logged")
    g.add_argument("--profile", action="store_true",
                   help="torch profiler trace of steps [--profile-step-start, --profile-step-end) into "
                        "--tensorboard-dir (opens in Perfetto and TensorBoard)")
    g.add_argument("--use-pytorch-profiler", action="store_true", help="accepted: --profile uses it")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that profile")
    g.add_argument("--log-thought-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="at --log-interval: the Jacobi residual of each pass and the thought/token input norms "
                        "(loops: the change between loops; interpolated thoughts: the mixing entropy)")
    g.add_argument("--jacobi-iters-eval-sweep", type=int, nargs="*", default=None, metavar="J",
                   help="at each validation, also the loss at these J (default: 0, 1 and 2x the evaluation J; "
                        "none given: off)")
    g.add_argument("--eval-tasks", default=None, metavar="TASKS",
                   help="lm-eval accuracy of the saved checkpoints, in a background process: task names "
                        "(comma-separated), a directory of task YAMLs, or `paper` (needs the [eval] extra)")
    g.add_argument("--eval-tasks-interval", type=int, default=None,
                   help="evaluate the checkpoints saved at multiples of this (default: every save, and the last)")
    g.add_argument("--eval-tasks-limit", type=float, default=None,
                   help="examples per task (a fraction when < 1; default: all)")
    g.add_argument("--eval-tasks-batch-size", default="8", help="lm-eval's --batch_size")


def _check_monitoring_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.wandb_project:
        from megatron_latent.training.metrics import wandb_missing

        if wandb_missing():
            parser.error("--wandb-project needs the wandb package: pip install 'megatron-latent[wandb]'")
        if not (args.save or args.wandb_save_dir):
            parser.error("--wandb-project needs --save or --wandb-save-dir (W&B's files and the run id live there)")
    if args.eval_tasks:
        _check_eval_tasks(parser, args)
    if args.profile:
        if not args.tensorboard_dir:
            parser.error("--profile needs --tensorboard-dir (the trace is written there)")
        if not 1 <= args.profile_step_start < args.profile_step_end:
            parser.error(f"--profile-step-start {args.profile_step_start} and --profile-step-end "
                         f"{args.profile_step_end}: need 1 <= start < end")


def _check_eval_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import importlib.util

    from megatron_latent.training.downstream import resolve_tasks

    if not args.save:
        parser.error("--eval-tasks needs --save (the saved checkpoints are evaluated)")
    if args.tokenizer_type != "HuggingFaceTokenizer" or not args.tokenizer_model:
        parser.error("--eval-tasks needs --tokenizer-type HuggingFaceTokenizer and --tokenizer-model "
                     "(lm-eval reads the exported model with its tokenizer)")
    if importlib.util.find_spec("lm_eval") is None:
        parser.error("--eval-tasks needs lm-evaluation-harness: pip install 'megatron-latent[eval]'")
    try:
        resolve_tasks(args.eval_tasks)
    except ValueError as e:
        parser.error(flag_error(e, parser))
    n = args.eval_tasks_interval
    if n is not None and (n < 1 or (args.save_interval and n % args.save_interval)):
        parser.error(f"--eval-tasks-interval {n}: a positive multiple of --save-interval {args.save_interval}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the flags that need no model or world to check (one error naming the flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors, args.megatron_notes = megatron_flags.verdicts(args, parser)
    if errors:
        parser.error(errors[0])
    if args.tokenizer_type == "NullTokenizer":
        # Megatron-LM's tokenizer of pre-tokenized ids; here the mock data's ids 0 .. --vocab-size - 1.
        if not args.mock_data:
            parser.error("--tokenizer-type NullTokenizer: supported with --mock-data only (real data needs the "
                         "tokenizer it was preprocessed with)")
        args.tokenizer_type = None
        args.megatron_notes.append("--tokenizer-type NullTokenizer: the mock data's token ids 0 .. --vocab-size - 1")
    if args.grad_reduce_in_bf16 and not args.bf16:
        parser.error("--grad-reduce-in-bf16 applies to --bf16")
    sources = sum(x is not None for x in (args.data_path, args.train_data_path)) + int(args.mock_data)
    if sources != 1:
        parser.error("give exactly one data source: --mock-data, --data-path, or --train-data-path")
    if not args.mock_data and args.tokenizer_type is None:
        parser.error("--data-path/--train-data-path need --tokenizer-type (and its files)")
    for flag in ("finetune", "use_checkpoint_args"):
        if getattr(args, flag) and not args.load:
            parser.error(f"--{flag.replace('_', '-')} needs --load")
    if args.save_interval is not None and not args.save:
        # Megatron-LM accepts it (its scripts pass it with and without --save): nothing is saved.
        args.megatron_notes.append("--save-interval without --save: no checkpoints are written")
    if args.async_save and not args.save:
        parser.error("--async-save needs --save")
    for flag in ("keep_last_n_checkpoints", "save_retain_interval", "extra_save_iters"):
        value = getattr(args, flag)
        if value is not None and not args.save:
            parser.error(f"--{flag.replace('_', '-')} needs --save")
        if value is not None and min(value if isinstance(value, list) else [value - 1]) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= {0 if isinstance(value, list) else 1}, got {value}")
    if args.exit_signal_handler and not args.save:
        parser.error("--exit-signal-handler needs --save")
    if args.train_samples is not None:
        # Megatron-LM's sample-based schedule: iterations are derived, the iteration flags not given.
        given = [f for f, v in (("--train-iters", args.train_iters), ("--lr-decay-iters", args.lr_decay_iters),
                                ("--lr-warmup-iters", args.lr_warmup_iters or None),
                                ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters)) if v is not None]
        if given[:1] == ["--train-iters"]:
            parser.error("give one of --train-iters and --train-samples")
        if given:
            parser.error(f"{given[0]} with --train-samples: give {given[0].replace('iters', 'samples')} (the schedule "
                         "counts samples)")
        if args.rampup_batch_size is not None:
            error = rampup_error(args.rampup_batch_size, args.global_batch_size)
            if error:  # in the library's words (global_batch_size): shown as flags
                parser.error(flag_error(ValueError(
                    f"rampup_batch_size {' '.join(map(str, args.rampup_batch_size))}: {error}")))
        first = args.rampup_batch_size[0] if args.rampup_batch_size else args.global_batch_size
        if args.train_samples < first:
            parser.error(f"--train-samples {args.train_samples} is less than one global batch ({first})")
        # Megatron-LM's count: the rampup's iterations, then full batches.
        args.train_iters = BatchSizes(args.global_batch_size, rampup=args.rampup_batch_size).train_iters(
            args.train_samples)
    else:
        given = [f for f, v in (("--lr-decay-samples", args.lr_decay_samples),
                                ("--lr-warmup-samples", args.lr_warmup_samples or None),
                                ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples)) if v is not None]
        if args.rampup_batch_size is not None and not given:
            parser.error("--rampup-batch-size needs --train-samples: Megatron-LM ramps the batch up in sample-based "
                         "training only (with --train-iters it stops: 'expected no batch-size rampup for "
                         "iteration-based training')")
        if given:
            parser.error(f"{given[0]} needs --train-samples (the schedule counts iterations with --train-iters)")
        if args.train_iters is None:
            args.train_iters = 20
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        parser.error("--decoupled-min-lr applies to --decoupled-lr (the embedding and output layer's lr); give both")
    if args.decoupled_lr is not None:
        low, flag = (args.min_lr, "--min-lr") if args.decoupled_min_lr is None else (args.decoupled_min_lr,
                                                                                      "--decoupled-min-lr")
        if not 0 <= low <= args.decoupled_lr:
            parser.error(f"the embedding and output layer's lr decays from --decoupled-lr {args.decoupled_lr} to "
                         f"{flag} {low}: give 0 <= {flag} <= --decoupled-lr")
    if (args.lr_warmup_fraction is not None) and (args.lr_warmup_iters or args.lr_warmup_samples):
        parser.error("give one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples")
    for flag in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction <= 1.0:
        parser.error(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        parser.error("give one of --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler")
    if args.eval_iters < 0:
        parser.error(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins < 0:
        parser.error(f"--exit-duration-in-mins must be >= 0, got {args.exit_duration_in_mins}")
    if args.exit_interval is not None and args.exit_interval < 1:
        parser.error(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.recompute_activations:
        if args.recompute_granularity not in (None, "selective"):
            parser.error("--recompute-activations is --recompute-granularity selective; do not combine it with "
                         f"--recompute-granularity {args.recompute_granularity}")
        args.recompute_granularity = "selective"
    if args.recompute_modules and "layernorm" in args.recompute_modules:
        # megatron-core recomputes unfused norms through Transformer Engine's FP8 state only; with
        # Transformer Engine the norms are fused into the next linear, with nothing to recompute.
        parser.error("--recompute-modules layernorm: megatron-core 0.16.1 recomputes norms only through "
                     "Transformer Engine, whose fused norms this project's TE layers use; give core_attn and/or mlp")
    if args.recompute_modules and args.recompute_granularity != "selective":
        parser.error("--recompute-modules applies to --recompute-granularity selective (or --recompute-activations)")
    if args.lr_decay_iters is not None and args.lr_decay_iters < 1:
        parser.error(f"--lr-decay-iters must be >= 1, got {args.lr_decay_iters}")
    _check_monitoring_flags(parser, args)
    return args


# Megatron-LM's defaults for what its GPT flags leave out (a GPT-2 shaped model: LayerNorm, GeLU,
# learned absolute positions, biases, tied embeddings; its init and dropout).
MEGATRON_DEFAULTS = dict(arch="gpt2", activation="gelu", hidden_dropout=0.1, attention_dropout=0.1,
                         init_style="megatron", init_method_std=0.02, name="custom")


def architecture_overrides(args: argparse.Namespace) -> dict:
    """ModelConfig fields of the Megatron-LM architecture flags given (raises ConfigError)."""
    out = {}
    for field, flag in (("normalization", "normalization"), ("norm_epsilon", "norm_epsilon"),
                        ("rotary_percent", "rotary_percent"), ("rotary_base", "rotary_base"),
                        ("kv_channels", "kv_channels"), ("hidden_dropout", "hidden_dropout"),
                        ("attention_dropout", "attention_dropout"), ("position_embedding_type",
                                                                     "position_embedding_type")):
        if getattr(args, flag) is not None:
            out[field] = getattr(args, flag)
    if args.swiglu and args.squared_relu:
        raise ConfigError("give one of --swiglu and --squared-relu")
    if args.swiglu or args.squared_relu:
        out["activation"] = "swiglu" if args.swiglu else "squared_relu"
    if args.use_rotary_position_embeddings:
        if out.get("position_embedding_type", "rope") != "rope":
            raise ConfigError("--use-rotary-position-embeddings is --position-embedding-type rope; do not combine "
                              f"it with --position-embedding-type {out['position_embedding_type']}")
        out["position_embedding_type"] = "rope"
    if args.use_rope_scaling:
        out["rope_scaling"] = True
    if args.rope_scaling_factor is not None:
        out["rope_scaling_factor"] = args.rope_scaling_factor
    if args.untie_embeddings_and_output_weights:
        out["tie_embeddings"] = False
    if args.disable_bias_linear:
        # Megatron-LM: the qkv projection has a bias with either flag.
        out.update(add_bias_linear=False, add_qkv_bias=args.add_qkv_bias)
    elif args.add_qkv_bias:
        out["add_qkv_bias"] = True
    if args.qk_layernorm:
        out["qk_layernorm"] = True
    if args.apply_layernorm_1p:
        out["apply_layernorm_1p"] = True
    if args.group_query_attention:
        out["num_query_groups"] = 1 if args.num_query_groups is None else args.num_query_groups
    elif args.num_query_groups is not None:
        raise ConfigError("--num-query-groups takes effect with --group-query-attention (Megatron-LM ignores it "
                          "without); give both")
    if args.init_method_std is not None or args.init_style is not None:
        style = args.init_style or "megatron"
        out.update(init_style=style, init_method_std=args.init_method_std if style != "paper" else None)
        if style == "paper" and args.init_method_std is not None:
            raise ConfigError("--init-method-std applies to --init-style megatron or hf (the paper's init sets its "
                              "own std)")
    return out


def _megatron_model(args: argparse.Namespace, overrides: dict) -> ModelConfig:
    """The model Megatron-LM builds from these flags alone (no preset)."""
    missing = [f for f in ("--num-layers", "--hidden-size", "--num-attention-heads")
               if getattr(args, f[2:].replace("-", "_")) is None]
    if missing:
        raise ConfigError(f"give {', '.join(missing)} (or a --model-preset): without a preset the flags describe "
                          "the whole model, as in Megatron-LM")
    if "seq_length" not in overrides:
        if args.seq_length is None:
            raise ConfigError("give --seq-length or --max-position-embeddings (or a --model-preset)")
        overrides["seq_length"] = args.seq_length
    if "vocab_size" not in overrides:
        raise ConfigError("--mock-data without --tokenizer-type needs --vocab-size (or a --model-preset)")
    h = overrides["hidden_size"]
    if "ffn_hidden_size" not in overrides:
        # Megatron-LM's: 4 H, or for SwiGLU 2/3 of it rounded down to a multiple of 64.
        swiglu = overrides.get("activation") == "swiglu"
        overrides["ffn_hidden_size"] = int(4 * h * 2 / 3 / 64) * 64 if swiglu else 4 * h
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    base = {k: v for k, v in {**MEGATRON_DEFAULTS, **overrides}.items() if k in fields}
    latent = {k: v for k, v in overrides.items() if k not in fields}  # LatentSettings' fields
    return ModelConfig(**base).replace(**latent)


def model_config_from_args(args: argparse.Namespace, vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig the flags describe: the preset (or, with --use-checkpoint-args, the
    checkpoint's model; with neither, Megatron-LM's defaults) with the fields the flags give replaced.

    `vocab_size` is the tokenizer's (real data); without one, --vocab-size or the preset's.
    Latent flags left out keep the preset's or the checkpoint's values. Raises ConfigError.
    """
    overrides = {
        field: getattr(args, flag)
        for field, flag in (
            ("num_layers", "num_layers"), ("hidden_size", "hidden_size"), ("ffn_hidden_size", "ffn_hidden_size"),
            ("num_attention_heads", "num_attention_heads"),
            ("seq_length", "max_position_embeddings"), ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by"),
            ("num_latent_thoughts", "num_latent_thoughts"), ("jacobi_iters_eval", "jacobi_iters_eval"),
            ("scale_embeddings", "scale_embeddings"),
            ("grad_passes", "jacobi_grad_passes"), ("thought_input", "thought_input"),
            ("interpolation_topk", "interpolation_topk"), ("ponder_feedback", "ponder_feedback"),
            ("ponder_residual", "ponder_residual"),
        )
        if getattr(args, flag) is not None
    }
    overrides.update(architecture_overrides(args))
    # The method's size flags: one given switches the model (a preset's or a checkpoint's) to that
    # method, so the others not given are off; two given (> 0) are refused by LatentSettings.
    methods = {f: getattr(args, f) for f in METHOD_SIZE_FIELDS if getattr(args, f) is not None}
    if any(methods.values()):
        overrides.update({f: 0 for f in METHOD_SIZE_FIELDS})
        if not methods.get("num_latent_thoughts"):
            overrides.setdefault("grad_passes", None)  # a latent checkpoint's, meaningless for the others
    overrides.update(methods)
    if args.jacobi_iters is not None:
        overrides["jacobi_iters"] = tuple(args.jacobi_iters)
    if vocab_size is not None:
        if args.vocab_size is not None and args.vocab_size != vocab_size:
            raise ConfigError(f"vocab_size {args.vocab_size} differs from the tokenizer's {vocab_size}")
        overrides["vocab_size"] = vocab_size
    elif args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if args.use_checkpoint_args:
        cfg = checkpoint_model_config(args.load, resolve_iteration(args.load)).replace(**overrides)
    elif args.model_preset is not None:
        cfg = get_preset(args.model_preset, **overrides)
    else:
        cfg = _megatron_model(args, overrides)
    if args.jacobi_iters is not None and not cfg.latent.num_latent_thoughts:
        raise ConfigError(f"jacobi_iters was given for a model with num_latent_thoughts 0 ({cfg.latent.method}): "
                          "only latent thoughts are refined by Jacobi passes")
    cfg.check_sequence_fits(args.seq_length if args.seq_length is not None else cfg.seq_length)
    return cfg

# The library's names (function arguments, config and state fields) whose flag is not the parser
# destination of the same name: the one table every command line translates library errors with
# (cli.flag_message; an entry applies where the parser has the flags it names).
LIBRARY_FLAGS = {
    "grad_passes": "--jacobi-grad-passes",
    "ponder_residual": "--ponder-residual",
    "rope_scaling": "--use-rope-scaling",
    "seq_length": "--max-position-embeddings",  # ModelConfig.seq_length is the model's context
    "num_microbatches": "the micro-batch count (--global-batch-size / (--micro-batch-size x data-parallel size))",
    # Checkpoints: resume, checkpoint_layout, checkpointing (Retention), hf.export.
    "load_dir": "--load",
    "save_dir": "--save",
    "load_optim=False": "--no-load-optim",
    "keep_last": "--keep-last-n-checkpoints",
    "retain_interval": "--save-retain-interval",
    # OptimizerParamScheduler's arguments (a resumed run compares its state with the checkpoint's).
    "max_lr": "--lr",
    "lr_warmup_steps": "the warmup steps (--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction)",
    "lr_decay_steps": "the decay steps (--lr-decay-iters/--lr-decay-samples/--train-iters/--train-samples)",
    "start_wd": "the initial weight decay (--weight-decay/--start-weight-decay)",
    "end_wd": "the final weight decay (--weight-decay/--end-weight-decay)",
    "wd_incr_style": "--weight-decay-incr-style",
    "wd_incr_steps": "the weight decay steps (--train-iters/--train-samples)",
    # Data (DataArgs; `split` alone is a plain word).
    "DataArgs.split": "--split",
    "inputs": "--input",
}


def flag_error(error: BaseException, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """A library error with its argument and field names shown as the flags of `parser` (default:
    pretrain's) through LIBRARY_FLAGS."""
    return flag_message(error, parser if parser is not None else build_parser(), LIBRARY_FLAGS)


if __name__ == "__main__":  # the table of docs/megatron_flags.md: printed, or rewritten there with --update PATH
    if sys.argv[1:2] == ["--update"]:
        megatron_flags.update_doc(sys.argv[2], build_parser())
    else:
        print(megatron_flags.markdown(build_parser()), end="")
