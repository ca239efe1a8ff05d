"""Megatron-LM's flags that the driver does not implement: each is refused with the reason, or
accepted with a note where it changes nothing here. One table, rendered in docs/megatron_flags.md
(`python -m megatron_latent.training.arguments` prints that page's table, `--update
docs/megatron_flags.md` rewrites it there).

The driver's own parser (training/arguments.py) holds the supported ones, with Megatron-LM's
meaning; a flag defined there is supported, whatever this table says.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

REFUSED, NO_EFFECT = "refused", "no effect"


@dataclass(frozen=True)
class Flag:
    status: str  # REFUSED or NO_EFFECT
    note: str  # the reason (refused) or why nothing changes (no effect)
    nargs: object = 0  # 0: a switch; 1: one value; "*": a list
    # For flags whose verdict depends on the value: value -> None (accepted, no effect) or the
    # reason it is refused. The note then describes the accepted values.
    check: Optional[Callable[[object], Optional[str]]] = None


def _only(accepted, reason: str):
    def check(value):
        return None if str(value) in accepted else reason
    return check


_FP8 = "FP8 needs Transformer Engine on a Hopper (or newer) GPU and is not wired into the latent passes; use --bf16"
_MOE = "mixture-of-experts layers are not built here (dense GPT models only)"
_GPU_ONLY = "a GPU kernel or overlap choice; the same numbers are computed here"
_NOT_LOGGED = "not logged here (training is unchanged)"

TABLE: Dict[str, Flag] = {
    # ------------------------------------------------------------------ precision
    "--fp16": Flag(REFUSED, "fp16 needs dynamic loss scaling, whose skipped steps the training step, the "
                            "divergence check and resumption do not handle here; use --bf16 (fp32 main weights, "
                            "no loss scaling)"),
    "--loss-scale": Flag(REFUSED, "applies to --fp16, which is not supported", 1),
    "--initial-loss-scale": Flag(REFUSED, "applies to --fp16, which is not supported", 1),
    "--min-loss-scale": Flag(REFUSED, "applies to --fp16, which is not supported", 1),
    "--loss-scale-window": Flag(REFUSED, "applies to --fp16, which is not supported", 1),
    "--hysteresis": Flag(REFUSED, "applies to --fp16, which is not supported", 1),
    "--fp8-format": Flag(REFUSED, _FP8, 1),
    "--fp8-recipe": Flag(REFUSED, _FP8, 1),
    "--fp8-amax-history-len": Flag(REFUSED, _FP8, 1),
    "--fp8-amax-compute-algo": Flag(REFUSED, _FP8, 1),
    "--fp8-param-gather": Flag(REFUSED, _FP8),
    "--use-precision-aware-optimizer": Flag(REFUSED, "needs Transformer Engine's FusedAdam; the optimizer keeps "
                                                     "fp32 main weights and moments"),
    "--main-grads-dtype": Flag(NO_EFFECT, "fp32 only: main gradients are fp32", 1,
                               _only(("fp32",), "main gradients are fp32 here (see --grad-reduce-in-bf16)")),
    "--main-params-dtype": Flag(NO_EFFECT, "fp32 only: main weights are fp32", 1,
                                _only(("fp32",), "main weights are fp32 here")),
    "--accumulate-allreduce-grads-in-fp32": Flag(NO_EFFECT, "gradients are accumulated and reduced in fp32 already "
                                                            "(with --bf16 unless --grad-reduce-in-bf16)"),
    "--attention-softmax-in-fp32": Flag(NO_EFFECT, "the attention softmax is computed in fp32 already"),
    "--apply-query-key-layer-scaling": Flag(NO_EFFECT, "an fp16 overflow guard that leaves the attention scores "
                                                       "unchanged; fp16 is not supported"),
    # ------------------------------------------------------------------ model
    "--use-mcore-models": Flag(NO_EFFECT, "models are always megatron-core's GPTModel"),
    "--use-legacy-models": Flag(REFUSED, "only megatron-core models are built"),
    "--transformer-impl": Flag(NO_EFFECT, "chosen automatically: Transformer Engine when it imports on a GPU, "
                                          "else megatron-core's local modules", 1),
    "--attention-backend": Flag(NO_EFFECT, "the backend follows --transformer-impl's automatic choice (torch's "
                                           "fused attention locally, TE's with Transformer Engine)", 1),
    "--use-flash-attn": Flag(NO_EFFECT, "the attention kernel is chosen automatically (see --attention-backend)"),
    "--spec": Flag(REFUSED, "the layer spec follows the architecture flags (models/specs.py)", "*"),
    "--num-experts": Flag(REFUSED, _MOE, 1),
    "--expert-model-parallel-size": Flag(NO_EFFECT, "1 only", 1, _only(("1",), _MOE)),
    "--multi-latent-attention": Flag(REFUSED, "multi-latent attention is not built here (standard and "
                                              "grouped-query attention only)"),
    "--rotary-interleaved": Flag(REFUSED, "interleaved rotary pairs are not implemented (half-split pairs, as "
                                          "Hugging Face's)"),
    "--rotary-seq-len-interpolation-factor": Flag(REFUSED, "position interpolation is not implemented", 1),
    "--no-rope-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-masked-softmax-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-bias-gelu-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-bias-swiglu-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-bias-dropout-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-gradient-accumulation-fusion": Flag(NO_EFFECT, _GPU_ONLY),
    "--no-async-tensor-model-parallel-allreduce": Flag(NO_EFFECT, _GPU_ONLY),
    "--cross-entropy-loss-fusion": Flag(NO_EFFECT, "the loss already runs as one fused kernel at one tensor-parallel "
                                                   "rank (torch's cross entropy), megatron's vocab-parallel one above"),
    "--use-cpu-initialization": Flag(NO_EFFECT, "weights are always drawn whole on the CPU, per layer from --seed: "
                                                "the same model at every TP/PP/VPP layout"),
    "--enable-cuda-graph": Flag(NO_EFFECT, "CUDA graphs are not captured here (the same numbers, without the "
                                           "launch savings)"),
    # ------------------------------------------------------------------ parallelism
    "--context-parallel-size": Flag(
        NO_EFFECT, "1 only", 1,
        _only(("1",), "context parallelism splits the sequence over ranks, while every latent pass needs each "
                      "position's thoughts beside its token on one rank (its attention spans the interleaved "
                      "sequence); use tensor + sequence parallelism")),
    "--overlap-grad-reduce": Flag(NO_EFFECT, "gradients are reduced after the backward (the same gradients, no "
                                             "overlap)"),
    "--overlap-param-gather": Flag(NO_EFFECT, "the distributed optimizer gathers weights after its step (the same "
                                              "weights, no overlap)"),
    "--ddp-average-in-collective": Flag(NO_EFFECT, "gradients are averaged over the tokens of the global batch "
                                                   "(per-token loss) in every case"),
    "--num-layers-per-virtual-pipeline-stage": Flag(REFUSED, "give --num-virtual-stages-per-pipeline-rank (the "
                                                             "layers per pipeline rank divided by this)", 1),
    "--distributed-backend": Flag(NO_EFFECT, "chosen by the platform: NCCL on GPUs, gloo on CPUs", 1),
    "--empty-unused-memory-level": Flag(NO_EFFECT, "CUDA's caching allocator is not emptied between steps", 1),
    "--deterministic-mode": Flag(NO_EFFECT, "CPU kernels are deterministic; on GPUs torch's defaults apply"),
    # ------------------------------------------------------------------ training
    "--calculate-per-token-loss": Flag(NO_EFFECT, "on always: the loss and its gradient are averaged over the "
                                                  "tokens of the global batch"),
    "--manual-gc": Flag(NO_EFFECT, "Python's garbage collector runs as usual (a timing aid, training unchanged)"),
    "--manual-gc-interval": Flag(NO_EFFECT, "Python's garbage collector runs as usual", 1),
    "--no-save-optim": Flag(REFUSED, "checkpoints always hold the optimizer state, so that runs resume exactly"),
    "--no-load-rng": Flag(NO_EFFECT, "checkpoints hold no RNG state: a run's randomness follows --seed and the "
                                     "iteration"),
    "--no-save-rng": Flag(NO_EFFECT, "checkpoints hold no RNG state: a run's randomness follows --seed and the "
                                     "iteration"),
    "--ckpt-format": Flag(NO_EFFECT, "torch_dist only: checkpoints are megatron's distributed format", 1,
                          _only(("torch_dist",), "checkpoints are megatron's distributed format (torch_dist) only")),
    "--use-dist-ckpt": Flag(NO_EFFECT, "checkpoints are megatron's distributed format always"),
    "--dataloader-type": Flag(NO_EFFECT, "single only: samples are read in order, once", 1,
                              _only(("single",), "only the single (ordered, one pass) data loader is implemented")),
    "--no-create-attention-mask-in-dataloader": Flag(NO_EFFECT, "the data loader builds no mask (the causal mask "
                                                                "is the model's), except for --reset-attention-mask"),
    "--tiktoken-pattern": Flag(NO_EFFECT, "applies to TikTokenizer, which is not supported; ignored with "
                                          "--tokenizer-type NullTokenizer", 1),
    "--legacy-tokenizer": Flag(NO_EFFECT, "the tokenizers here have one implementation"),
    # ------------------------------------------------------------------ logging and profiling
    "--log-progress": Flag(NO_EFFECT, _NOT_LOGGED),
    "--log-num-zeros-in-grad": Flag(NO_EFFECT, _NOT_LOGGED),
    "--log-timers-to-tensorboard": Flag(NO_EFFECT, _NOT_LOGGED),
    "--log-validation-ppl-to-tensorboard": Flag(NO_EFFECT, "the validation loss is logged; its perplexity is printed"),
    "--log-loss-scale-to-tensorboard": Flag(NO_EFFECT, "no loss scaling (fp16 is not supported)"),
    "--no-log-loss-scale-to-tensorboard": Flag(NO_EFFECT, "no loss scaling (fp16 is not supported)"),
    "--timing-log-level": Flag(NO_EFFECT, _NOT_LOGGED, 1),
}


def add_to_parser(parser: argparse.ArgumentParser) -> None:
    """The table's flags, each in a hidden group (the parser's own flags take precedence)."""
    group = parser.add_argument_group("Megatron-LM flags refused, or without effect here (docs/megatron_flags.md)")
    taken = set(parser._option_string_actions)
    for flag, row in TABLE.items():
        if flag in taken:
            continue
        dest = "megatron_" + flag[2:].replace("-", "_")
        if row.nargs == 0:
            group.add_argument(flag, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=dest, nargs=None if row.nargs == 1 else row.nargs, default=None,
                               help=argparse.SUPPRESS)


def verdicts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Tuple[List[str], List[str]]:
    """(errors, notes) for the table's flags given on the command line: one line each."""
    errors, notes = [], []
    for flag, row in TABLE.items():
        action = parser._option_string_actions.get(flag)
        dest = "megatron_" + flag[2:].replace("-", "_")
        if action is None or action.dest != dest:
            continue  # defined by the driver itself
        value = getattr(args, dest)
        if value in (None, False):
            continue
        shown = flag if row.nargs == 0 else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        if row.check is not None:
            reason = row.check(value)
            if reason is not None:
                errors.append(f"{shown}: {reason}")
            else:
                notes.append(f"{shown} has no effect here: {row.note}")
        elif row.status == REFUSED:
            errors.append(f"{shown}: {row.note}")
        else:
            notes.append(f"{shown} has no effect here: {row.note}")
    return errors, notes


# Flags of the driver that Megatron-LM does not have (the rest of its parser is Megatron-LM's).
PROJECT_FLAGS = frozenset({
    "--help", "--model-preset", "--init-style", "--num-latent-thoughts", "--jacobi-iters", "--jacobi-iters-eval",
    "--jacobi-grad-passes", "--scale-embeddings", "--no-scale-embeddings", "--thought-input",
    "--interpolation-topk", "--num-pause-tokens", "--num-extra-loops",
})


def supported_flags(parser: argparse.ArgumentParser) -> List[Tuple[str, str]]:
    """(flag, help) of the Megatron-LM flags the driver implements."""
    rows = []
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.help == argparse.SUPPRESS or any(f in PROJECT_FLAGS for f in flags):
            continue
        rows.append((" / ".join(flags), (action.help or "").replace("%(default)s", str(action.default))))
    return rows


def markdown(parser: argparse.ArgumentParser) -> str:
    """The docs' table: supported, refused, no effect."""
    lines = ["| flag | here | note |", "|---|---|---|"]
    for flag, text in supported_flags(parser):
        lines.append(f"| `{flag}` | supported | {text} |")
    taken = {f for a in parser._actions if a.help != argparse.SUPPRESS for f in a.option_strings}
    for status in (REFUSED, NO_EFFECT):
        for flag, row in TABLE.items():
            if row.status == status and flag not in taken:
                note = row.note if row.check is None else f"{row.note}; other values refused"
                lines.append(f"| `{flag}` | {status} | {note} |")
    return "\n".join(lines) + "\n"


def counts(parser: argparse.ArgumentParser) -> Dict[str, int]:
    taken = {f for a in parser._actions if a.help != argparse.SUPPRESS for f in a.option_strings}
    out = {"supported": len(supported_flags(parser))}
    for status in (REFUSED, NO_EFFECT):
        out[status] = sum(1 for f, r in TABLE.items() if r.status == status and f not in taken)
    return out


START, END = "<!-- table: generated -->\n", "<!-- end of table -->"


def update_doc(path: str, parser: argparse.ArgumentParser) -> None:
    """Rewrite the generated table of the docs page at `path` (between its two markers)."""
    with open(path) as f:
        head, rest = f.read().split(START)
    with open(path, "w") as f:
        f.write(head + START + markdown(parser) + END + rest.split(END)[1])
