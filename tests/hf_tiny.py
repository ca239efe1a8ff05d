"""Tiny random Hugging Face reference models (no downloads) for the architecture parity tests."""

from __future__ import annotations

import torch

VOCAB = 250  # not a multiple of 128: the megatron side pads to 256
SEQ = 24


# The HF class of each hf_model name, and our family of it.
FAMILY = {"gpt2": "gpt2", "gpt-neox": "gpt-neox", "llama": "llama", "llama3": "llama", "qwen2": "qwen2",
          "qwen3": "qwen3"}


def hf_model(arch: str, seed: int = 0):
    """A tiny stock transformers causal LM of `arch` (a FAMILY key), fp32, eval mode, with weights large enough
    that every tensor (biases and norms included) visibly moves the logits."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "gpt-neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                               max_position_embeddings=32, rotary_pct=0.25, rotary_emb_base=10000,
                               use_parallel_residual=True, tie_word_embeddings=False, **common)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, max_position_embeddings=32, rms_norm_eps=1e-6,
                             rope_theta=10000.0, tie_word_embeddings=False, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "llama3":  # Llama-3.x: rope scaling, tied embeddings
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, max_position_embeddings=32, rms_norm_eps=1e-5,
                             rope_parameters=rope, tie_word_embeddings=True, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":  # Qwen2.5: q/k/v biases, tied embeddings
        cfg = tf.Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, max_position_embeddings=32, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
                             **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":  # Qwen3: per-head q/k RMSNorm, heads wider than hidden / heads, untied
        cfg = tf.Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, intermediate_size=96, max_position_embeddings=32, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                             **common)
        cls = tf.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    from parallel_utils import draw

    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = f"{arch}:{seed}:{name}"
            if p.dim() == 1:
                norm_weight = ("norm" in name or "ln_" in name) and name.endswith("weight")
                p.copy_(draw(key, p.shape, std=0.2, center=1.0 if norm_weight else 0.0))
            else:  # GPT-2's Conv1D weights are stored [in, out]
                p.copy_(draw(key, p.shape, std=p.shape[-1 if "c_" not in name else 0] ** -0.5))
    return model


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()
