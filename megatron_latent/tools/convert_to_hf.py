"""Export a megatron checkpoint (saved at any TP/PP) to one Hugging Face folder.

    python tools/convert_to_hf.py --load ckpt/ --save hf/ [--iteration 1000] \
        [--dtype float32|bfloat16|float16] [--tokenizer-model tokenizer.json] [--force]

Vanilla models export as the stock GPT2LMHeadModel / GPTNeoXForCausalLM / LlamaForCausalLM; every
other method (latent or interpolated thoughts, pause tokens, extra loops) adds modeling_latent.py
(load with trust_remote_code=True). See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (model_config.json + iter_*)")
    p.add_argument("--save", required=True, help="HF folder to write")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest complete one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer-model", default=None, help="tokenizers tokenizer.json (or its folder)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace an existing --save folder")
    args = p.parse_args(argv)

    from megatron_latent.config import ConfigError
    from megatron_latent.hf.export import export_to_hf
    from megatron_latent.hf.layout import CheckpointShapeError
    from megatron_latent.training.arguments import flag_error

    try:
        info = export_to_hf(args.load, args.save, iteration=args.iteration, dtype=args.dtype,
                            tokenizer_model=args.tokenizer_model, force=args.force,
                            max_shard_size=args.max_shard_size)
    except (ConfigError, CheckpointShapeError, ValueError, FileNotFoundError) as e:
        print(f"error: {flag_error(e, p)}", file=sys.stderr)
        return 2
    kind = f"{info['method']} (trust_remote_code=True)" if info["remote_code"] else "stock class"
    print(f"wrote {info['save']}: {info['arch']} N={info['num_latent_thoughts']} iteration {info['iteration']}, "
          f"{info['parameters']:,} parameters, {args.dtype}, {kind}"
          + ("" if info["tokenizer"] else "; no tokenizer (pass --tokenizer-model)"))
    return 0


if __name__ == "__main__":  # guard: megatron's checkpoint code may start spawn processes
    sys.exit(main())
