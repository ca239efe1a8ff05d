"""How a model's weights are drawn: the init functions megatron-core's TransformerConfig takes.

Three styles (`ModelConfig.init_style`): the paper's (the authors' code of each family), Megatron-LM's
and the stock Hugging Face init of the family. `init_methods(cfg)` gives them as TransformerConfig
fields; `describe_init(cfg)` says which one in a line. The init functions know their std (`Init`),
so the start-up line and the tests read it back, and are named classes, so configs stay picklable.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from megatron_latent.config.model import ModelConfig

# Whether the paper init's output projections count the passes through the stack (see init_methods):
# the authors' GPT-NeoX code divides their std by sqrt(2 L (N+1)), their LLaMA code by sqrt(2 L).
# GPT-2 has no authors' code: it takes the Pythia code's init, their main line of models; Qwen
# takes their LLaMA code's, the closest layer.
INIT_COUNTS_THOUGHT_PASSES = {"gpt2": True, "gpt-neox": True, "llama": False, "qwen2": False, "qwen3": False}


class Init:
    """An init function that knows its std: normal(0, std), or truncated at 3 std."""

    def __init__(self, std: float, truncated: bool):
        self.std, self.truncated = std, truncated

    def __call__(self, tensor):
        if self.truncated:
            return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=self.std, a=-3 * self.std, b=3 * self.std)
        return torch.nn.init.normal_(tensor, mean=0.0, std=self.std)


def init_methods(cfg: ModelConfig) -> Dict:
    """The init of `cfg` as TransformerConfig fields.

    The paper's (`init_style` "paper"; the authors' code, after Pythia's "small init"): every
    linear and the embedding ~ normal(0, std) truncated at 3 std with std = sqrt(2 / (5H)); the
    output projections (attention out, MLP out) further divided by sqrt(2 L D) for GPT-NeoX
    and GPT-2, D = `latent.residual_depth` (N+1 with latent thoughts, K+1 with extra loops or
    pondering: the prediction goes through the stack D times), and by sqrt(2 L) for LLaMA, as the
    authors' code of each family and method does (their GPT-NeoX pause and pondering models kept HF's
    init; we give every method the family's paper init, so that only the method differs). Norms 1,
    biases 0 (megatron's defaults).

    Megatron-LM's (`init_style` "megatron", std s = `init_method_std`): normal(0, s) everywhere,
    the output projections normal(0, s / sqrt(2 L)).

    Hugging Face's ("hf", std s): the stock init of the family, which the authors' vanilla
    baselines had: normal(0, s) everywhere; GPT-2 divides its output projections by sqrt(2 L)
    (HF's GPT2 does; its GPT-NeoX and LLaMA classes do not).
    """
    depth = 2.0 * cfg.num_layers
    if cfg.init_style != "paper":
        std = cfg.init_method_std
        scaled = cfg.init_style == "megatron" or cfg.arch == "gpt2"
        out_std = std / math.sqrt(depth) if scaled else std
        truncated = False
    else:
        if INIT_COUNTS_THOUGHT_PASSES[cfg.arch]:
            depth *= cfg.latent.residual_depth
        std = math.sqrt(2.0 / (5.0 * cfg.hidden_size))
        out_std = std / math.sqrt(depth)
        truncated = True
    return {
        "init_method": Init(std, truncated),
        "output_layer_init_method": Init(out_std, truncated),
        "embedding_init_method": Init(std, truncated),
        "init_method_std": std,
        "embedding_init_method_std": std,
    }


def describe_init(cfg: ModelConfig) -> str:
    """The init in a few words, with its stds (printed at start, beside ModelConfig.describe)."""
    init = init_methods(cfg)
    out = init["output_layer_init_method"].std
    if cfg.init_style == "paper":
        return f"paper init (truncated normal, std {init['init_method_std']:.4g}, output projections {out:.4g})"
    who = "Megatron-LM" if cfg.init_style == "megatron" else "HF"
    return f"{who} init (normal, std {cfg.init_method_std:.4g}, output projections {out:.4g})"
