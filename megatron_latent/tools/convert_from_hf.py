"""Convert a Hugging Face GPT-2 / GPT-NeoX / LLaMA / Qwen2 / Qwen3 folder into a megatron checkpoint.

    python tools/convert_from_hf.py --hf-dir pythia-410m/ --save ckpt/ \
        [--num-latent-thoughts 1] [--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2]

The checkpoint (megatron dist_checkpointing, plus model_config.json) loads with `--load` at any
TP/PP layout; the sizes given here are checked against the model so that a layout the model
cannot take fails now, not at training start. The latent settings come from config.json (the
authors' PonderLM-2 keys or our exports'; see docs/export.md); the flags override them. The
authors' config.json does not record which of their methods trained it: --patch-method says.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="local HF model folder (config.json + weights)")
    p.add_argument("--save", required=True, help="checkpoint directory to write")
    p.add_argument("--num-latent-thoughts", type=int, default=None, help="default: config.json's (else 0)")
    p.add_argument("--scale-embeddings", action="store_true", default=None, help="default: config.json's")
    p.add_argument("--patch-method", choices=("ours", "ponderlm", "loop", "pause"), default=None,
                   help="the authors' --patch_method of their checkpoint (their config.json writes the same keys for "
                        "PonderLM, PonderLM-2 with interpolated thoughts, Loop and Pause; default: "
                        "config.json's patch_method, else PonderLM-2, and interpolation true is refused)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    args = p.parse_args(argv)

    from megatron_latent.config import ConfigError
    from megatron_latent.hf.convert import convert_hf_to_checkpoint
    from megatron_latent.hf.layout import CheckpointShapeError
    from megatron_latent.training.arguments import flag_error

    given = {k: v for k, v in (("num_latent_thoughts", args.num_latent_thoughts),
                               ("scale_embeddings", args.scale_embeddings)) if v is not None}
    try:
        cfg = convert_hf_to_checkpoint(
            args.hf_dir, args.save,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            patch_method=args.patch_method,
            **given,
        )
    except (ConfigError, CheckpointShapeError, ValueError, FileNotFoundError) as e:
        print(f"error: {flag_error(e, p)}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}: {cfg.arch}, {cfg.num_parameters():,} parameters, "
          f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), N={cfg.latent.num_latent_thoughts}, "
          f"method {cfg.latent.label}")
    return 0


if __name__ == "__main__":  # guard: megatron's checkpoint writer re-imports __main__ (spawn)
    sys.exit(main())
