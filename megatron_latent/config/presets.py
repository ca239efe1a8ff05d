"""Named models (`--model-preset`): the paper's Pythia and LLaMA sizes, GPT-2, the dense Llama-3.x,
Qwen2.5 and Qwen3 models (the shapes of their Hugging Face config.json), and tiny test models."""

from __future__ import annotations

from typing import Dict

from megatron_latent.config.errors import ConfigError
from megatron_latent.config.model import ModelConfig


def _pythia(name, h, layers, heads):
    return ModelConfig(
        name=name, arch="gpt-neox", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=4 * h, vocab_size=50304, seq_length=2048, rotary_percent=0.25,
    )


def _llama(name, h, layers, heads, ffn):
    return ModelConfig(
        name=name, arch="llama", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=ffn, vocab_size=50304, seq_length=2048,
    )


def _gpt2(name, h, layers, heads):
    return ModelConfig(
        name=name, arch="gpt2", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=4 * h, vocab_size=50257, seq_length=1024,
    )


def _llama3(name, h, layers, heads, groups, ffn, tied, factor):
    # meta-llama/Llama-3.x: vocab 128256, 131072 positions, rope theta 500000 with llama3 scaling.
    return ModelConfig(
        name=name, arch="llama", num_layers=layers, hidden_size=h, num_attention_heads=heads,
        num_query_groups=groups, ffn_hidden_size=ffn, vocab_size=128256, seq_length=131072, norm_epsilon=1e-5,
        rotary_base=500000.0, rope_scaling=True, rope_scaling_factor=factor, tie_embeddings=tied,
    )


def _qwen(name, arch, h, layers, heads, groups, ffn, tied, seq, kv_channels=None):
    # Qwen/Qwen2.5-* and Qwen/Qwen3-*: vocab 151936, rope theta 1e6, RMSNorm eps 1e-6.
    return ModelConfig(
        name=name, arch=arch, num_layers=layers, hidden_size=h, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=ffn, vocab_size=151936, seq_length=seq, norm_epsilon=1e-6, rotary_base=1000000.0,
        tie_embeddings=tied, kv_channels=kv_channels,
    )


PRESETS: Dict[str, ModelConfig] = {
    c.name: c
    for c in (
        # Pythia (EleutherAI/pythia-*): GPT-NeoX, vocab 50304 (GPT-NeoX-20B tokenizer, padded).
        _pythia("pythia-70m", 512, 6, 8),
        _pythia("pythia-160m", 768, 12, 12),
        _pythia("pythia-410m", 1024, 24, 16),
        _pythia("pythia-1b", 2048, 16, 8),
        _pythia("pythia-1.4b", 2048, 24, 16),
        _pythia("pythia-2.8b", 2560, 32, 32),
        # The paper's LLaMA configurations (d / layers / heads / ffn).
        _llama("llama-125m", 768, 12, 12, 2064),
        _llama("llama-410m", 1024, 24, 16, 2752),
        _llama("llama-834m", 1536, 24, 24, 4128),
        _llama("llama-1.4b", 2048, 24, 32, 5504),
        _llama("llama-2.8b", 2048, 48, 32, 5504),
        # GPT-2 (openai-community/gpt2, -medium, -large).
        _gpt2("gpt2-small", 768, 12, 12),
        _gpt2("gpt2-medium", 1024, 24, 16),
        _gpt2("gpt2-large", 1280, 36, 20),
        # Llama-3.x (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B).
        _llama3("llama-3.2-1b", 2048, 16, 32, 8, 8192, tied=True, factor=32.0),
        _llama3("llama-3.2-3b", 3072, 28, 24, 8, 8192, tied=True, factor=32.0),
        _llama3("llama-3.1-8b", 4096, 32, 32, 8, 14336, tied=False, factor=8.0),
        # Qwen2.5 (Qwen/Qwen2.5-0.5B, -1.5B): biases on q, k, v.
        _qwen("qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, tied=True, seq=32768),
        _qwen("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, tied=True, seq=131072),
        # Qwen3 dense (Qwen/Qwen3-0.6B, -1.7B): q/k norm, heads of 128.
        _qwen("qwen3-0.6b", "qwen3", 1024, 28, 16, 8, 3072, tied=True, seq=40960, kv_channels=128),
        _qwen("qwen3-1.7b", "qwen3", 2048, 28, 16, 8, 6144, tied=True, seq=40960, kv_channels=128),
        # Tiny models for tests and the quickstart (TP up to 4, PP up to 4).
        ModelConfig(name="tiny-gpt2", arch="gpt2", num_layers=4, hidden_size=64, num_attention_heads=4,
                    ffn_hidden_size=256, vocab_size=256, seq_length=64),
        ModelConfig(name="tiny-pythia", arch="gpt-neox", num_layers=4, hidden_size=64, num_attention_heads=4,
                    ffn_hidden_size=256, vocab_size=256, seq_length=64, rotary_percent=0.25),
        ModelConfig(name="tiny-llama", arch="llama", num_layers=4, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=176, vocab_size=256, seq_length=64),
    )
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name (`--model-preset`), with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ConfigError(f"model_preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def describe_presets() -> str:
    """One line per preset: name, family, sizes and parameter count."""
    lines = []
    for c in PRESETS.values():
        lines.append(
            f"{c.name:13s} {c.arch:8s} layers={c.num_layers:<3d} hidden={c.hidden_size:<5d} "
            f"heads={c.num_attention_heads:<3d} groups={c.query_groups:<3d} ffn={c.ffn_hidden_size:<6d} "
            f"vocab={c.padded_vocab_size:<6d} params={c.num_parameters():,} "
            f"(non-embedding {c.num_parameters(include_embeddings=False):,})"
        )
    return "\n".join(lines)

