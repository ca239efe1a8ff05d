"""Command-line flags of the training driver, named as Megatron-LM names them (plus this project's
own), and their translation into the library's configuration objects."""

from __future__ import annotations

import argparse
from typing import List, Optional

from megatron_latent.cli import flag_message
from megatron_latent.config import ConfigError, ModelConfig, get_preset
from megatron_latent.config.model import METHOD_SIZE_FIELDS
from megatron_latent.training.checkpointing import checkpoint_model_config, resolve_iteration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_latent.pretrain",
        description="Pretrain a GPT (optionally with latent thoughts) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model (a preset, optionally with sizes replaced)")
    g.add_argument("--model-preset", default="tiny-llama",
                   help="architecture and sizes; `python -m megatron_latent.config` lists the presets")
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                 "--num-query-groups", "--max-position-embeddings", "--make-vocab-size-divisible-by"):
        g.add_argument(flag, type=int, default=None, help="replaces the preset's value")
    g.add_argument("--rotary-percent", type=float, default=None, help="replaces the preset's value")
    g.add_argument("--rotary-base", type=float, default=None, help="replaces the preset's value")
    g.add_argument("--seq-length", type=int, default=None,
                   help="training sequence length in tokens (default: --max-position-embeddings)")
    g.add_argument("--init-method-std", type=float, default=None,
                   help="the stock Hugging Face init of the family with this std, as the paper's vanilla baselines "
                        "had (0.02); default: the paper's init (docs/architectures.md)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size for --mock-data without a tokenizer (default: the preset's)")

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
                        "tokens and interpolated thoughts (default: on with any method, as the authors' code)")
    g.add_argument("--thought-input", choices=("hidden", "interpolated"), default=None,
                   help="what a thought is fed: the hidden state (PonderLM-2) or the embeddings mixed by its output "
                        "softmax (interpolated, PonderLM); default hidden")
    g.add_argument("--interpolation-topk", type=int, default=None, metavar="K",
                   help="interpolated thoughts mix the K likeliest tokens only (0 = the full softmax; default 0)")

    g = p.add_argument_group("baselines (each exclusive with latent thoughts and with each other)")
    g.add_argument("--num-pause-tokens", type=int, default=None, metavar="K",
                   help="K pause tokens after every token, one pass, predicting at the last (default 0)")
    g.add_argument("--num-extra-loops", type=int, default=None, metavar="K",
                   help="run the layer stack K+1 times with shared weights, the final norm once (default 0)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleave each rank's layers as this many virtual chunks (with the latent passes)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recomputation of core attention (= --recompute-granularity selective)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights and activations (fp32 main params in the optimizer)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of --train-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.1)
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
                   help="HuggingFaceTokenizer, SentencePieceTokenizer or GPT2BPETokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD")
    g.add_argument("--reset-attention-mask", action="store_true", help="no attention across EOD")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting the token after EOD")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the flags that need no model or world to check (one error naming the flag)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = sum(x is not None for x in (args.data_path, args.train_data_path)) + int(args.mock_data)
    if sources != 1:
        parser.error("give exactly one data source: --mock-data, --data-path, or --train-data-path")
    if not args.mock_data and args.tokenizer_type is None:
        parser.error("--data-path/--train-data-path need --tokenizer-type (and its files)")
    for flag in ("finetune", "use_checkpoint_args"):
        if getattr(args, flag) and not args.load:
            parser.error(f"--{flag.replace('_', '-')} needs --load")
    if args.save_interval is not None and not args.save:
        parser.error("--save-interval needs --save")
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
    for flag in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction <= 1.0:
        parser.error(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        parser.error("give one of --lr-warmup-fraction and --lr-warmup-iters")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        parser.error("give one of --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler")
    if args.eval_iters < 0:
        parser.error(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.exit_interval is not None and args.exit_interval < 1:
        parser.error(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.recompute_activations:
        if args.recompute_granularity not in (None, "selective"):
            parser.error("--recompute-activations is --recompute-granularity selective; do not combine it with "
                         f"--recompute-granularity {args.recompute_granularity}")
        args.recompute_granularity = "selective"
    return args


def model_config_from_args(args: argparse.Namespace, vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig the flags describe: the preset (or, with --use-checkpoint-args, the
    checkpoint's model) with the sizes and latent settings the flags give replaced.

    `vocab_size` is the tokenizer's (real data); without one, --vocab-size or the preset's.
    Latent flags left out keep the preset's or the checkpoint's values. Raises ConfigError.
    """
    overrides = {
        field: getattr(args, flag)
        for field, flag in (
            ("num_layers", "num_layers"), ("hidden_size", "hidden_size"), ("ffn_hidden_size", "ffn_hidden_size"),
            ("num_attention_heads", "num_attention_heads"), ("num_query_groups", "num_query_groups"),
            ("seq_length", "max_position_embeddings"), ("rotary_percent", "rotary_percent"),
            ("rotary_base", "rotary_base"), ("make_vocab_size_divisible_by", "make_vocab_size_divisible_by"),
            ("num_latent_thoughts", "num_latent_thoughts"), ("jacobi_iters_eval", "jacobi_iters_eval"),
            ("scale_embeddings", "scale_embeddings"), ("init_method_std", "init_method_std"),
            ("grad_passes", "jacobi_grad_passes"), ("thought_input", "thought_input"),
            ("interpolation_topk", "interpolation_topk"),
        )
        if getattr(args, flag) is not None
    }
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
    else:
        cfg = get_preset(args.model_preset, **overrides)
    if args.jacobi_iters is not None and not cfg.latent.num_latent_thoughts:
        raise ConfigError(f"jacobi_iters was given for a model with num_latent_thoughts 0 ({cfg.latent.method}): "
                          "only latent thoughts are refined by Jacobi passes")
    cfg.check_seq_length(args.seq_length if args.seq_length is not None else cfg.seq_length)
    return cfg

# Library names whose flag is not the parser destination of the same name.
_RENAMED = {
    "grad_passes": "--jacobi-grad-passes",
    "seq_length": "--max-position-embeddings",  # ModelConfig.seq_length is the model's context
    "num_microbatches": "the micro-batch count (--global-batch-size / (--micro-batch-size x data-parallel size))",
}


def flag_error(error: BaseException) -> str:
    """A library error with its field names shown as this command line's flags."""
    return flag_message(error, build_parser(), _RENAMED)
