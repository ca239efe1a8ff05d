"""Megatron checkpoint (any TP/PP) -> one Hugging Face folder.

The checkpoint (`<load>/model_config.json` + training/checkpointing.py's layout) is read in this
process as a world of one: the model is built at TP=1/PP=1 and megatron `dist_checkpointing`
reshards whatever layout it was saved at. The folder holds config.json, model.safetensors
(sharded with an index above `max_shard_size`, written by huggingface_hub), generation_config.json and,
given a tokenizer, tokenizer files that AutoTokenizer loads.

Vanilla without embedding scaling exports the stock architecture (GPT2LMHeadModel,
GPTNeoXForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), loadable without remote
code. Otherwise the config gets a `latent_*` model type, the authors' latent keys with their meaning
and the baselines' keys (hf/authors.py: interpolated thoughts, pause tokens, extra loops), prefill
defaults, and an `auto_map` to modeling_latent.py, copied into the folder: such a folder loads only
with `trust_remote_code=True`, so it is never silently run as a vanilla model.

Every transformers version setup.py admits (>= 4.46) reads the folder the same: config.json carries
the 4.x names next to the 5.x ones (GPT-NeoX `rotary_pct`/`rotary_emb_base`, LLaMA and Qwen
`rope_theta`, Llama-3.x `rope_scaling`, `torch_dtype`) and the GPT-NeoX head is stored as
`embed_out.weight`, the name 4.x loads and 5.x renames to `lm_head` on loading
(tests/test_hf_oldest_transformers.py loads exports under 4.46.3).

The folder is written under a temporary name next to the target and renamed at the end; an
existing target is replaced only with `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from huggingface_hub import save_torch_state_dict
from transformers import GenerationConfig, PreTrainedTokenizerFast

from megatron_latent.config import ModelConfig
from megatron_latent.config.model import LLAMA_LIKE
from megatron_latent.data.tokenizer import HuggingFaceTokenizer, TokenizerError
from megatron_latent.hf.authors import latent_to_hf
from megatron_latent.hf.layout import StateDict, merge_tp_pp
from megatron_latent.hf.mapping import config_to_hf, megatron_to_hf
from megatron_latent.inference.loading import load_single_process
from megatron_latent.models.gpt import build_gpt_model

MODELING_FILE = "modeling_latent.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LATENT_CLASSES = {"gpt2": "LatentGPT2LMHeadModel", "gpt-neox": "LatentGPTNeoXForCausalLM",
                   "llama": "LatentLlamaForCausalLM", "qwen2": "LatentQwen2ForCausalLM",
                   "qwen3": "LatentQwen3ForCausalLM"}
_LATENT_CONFIGS = {"gpt2": "LatentGPT2Config", "gpt-neox": "LatentGPTNeoXConfig", "llama": "LatentLlamaConfig",
                   "qwen2": "LatentQwen2Config", "qwen3": "LatentQwen3Config"}


class ExportError(ValueError):
    """Bad export input; the message names the argument or file."""


def is_latent(cfg: ModelConfig) -> bool:
    """Whether the export needs our remote code (any method but plain vanilla)."""
    return cfg.latent.method != "vanilla" or bool(cfg.latent.scale_embeddings)


def read_checkpoint(load_dir: str, iteration: Optional[int] = None):
    """(ModelConfig, full megatron state dict, iteration) of a checkpoint directory."""
    # Weights only: the latent forward is not needed here.
    model, cfg, iteration = load_single_process(load_dir, iteration, build_gpt_model)
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    del model
    return cfg, merge_tp_pp([[sd]], cfg), iteration


def hf_config_dict(cfg: ModelConfig, eos_token_id=None, dtype: str = "float32") -> dict:
    """config.json contents: the stock config, plus the latent fields and auto_map when latent."""
    hc = config_to_hf(cfg)
    # The stock defaults (GPT-2's 50256) may not even exist in this vocabulary: the tokenizer decides.
    hc.bos_token_id = hc.eos_token_id = eos_token_id
    d = hc.to_dict()
    d["dtype"] = d["torch_dtype"] = dtype
    # transformers 4.x names (5.x reads them too, and prefers rope_parameters, which agrees).
    if cfg.arch == "gpt-neox":
        d.update(rotary_pct=cfg.rotary_percent, rotary_emb_base=cfg.rotary_base)
    elif cfg.arch in LLAMA_LIKE:
        d["rope_theta"] = cfg.rotary_base
        if cfg.rope_scaling:
            d["rope_scaling"] = {k: v for k, v in d["rope_parameters"].items() if k != "rope_theta"}
    if is_latent(cfg):
        d["model_type"] = "latent_" + d["model_type"]
        d["architectures"] = [_LATENT_CLASSES[cfg.arch]]
        d["auto_map"] = {
            "AutoConfig": f"{MODELING_FILE[:-3]}.{_LATENT_CONFIGS[cfg.arch]}",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{_LATENT_CLASSES[cfg.arch]}",
        }
        d.update(latent_to_hf(cfg), latent_prefill="jacobi", jacobi_tolerance=1e-4, max_jacobi_iterations=None)
    return d


def write_weights(state: StateDict, out_dir: str, max_shard_size: str = "5GB") -> None:
    """model.safetensors, or shards and model.safetensors.index.json above `max_shard_size`, as
    transformers' save_pretrained writes them (huggingface_hub's writer, which also drops
    duplicates of tensors that share memory)."""
    save_torch_state_dict(state, out_dir, max_shard_size=max_shard_size)


def write_tokenizer(tokenizer_model: str, out_dir: str, vocab_size: int):
    """Tokenizer files AutoTokenizer loads, from a tokenizers JSON (file or folder). Returns the
    end-of-document token id."""
    if tokenizer_model.endswith(".model"):
        # transformers 5's conversion of sentencepiece models did not reproduce their ids (checked
        # against the sentencepiece library); rather no tokenizer than a wrong one.
        raise ExportError(f"tokenizer_model {tokenizer_model}: sentencepiece models are not exported yet; "
                          "pass a tokenizers tokenizer.json")
    try:
        ours = HuggingFaceTokenizer(tokenizer_model)
        path = os.path.join(tokenizer_model, "tokenizer.json") if os.path.isdir(tokenizer_model) else tokenizer_model
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    except TokenizerError as e:
        raise ExportError(f"tokenizer_model {e}") from e
    if ours.vocab_size > vocab_size:
        raise ExportError(
            f"tokenizer_model {tokenizer_model}: {ours.vocab_size} tokens, "
            f"more than the model's vocabulary {vocab_size}"
        )
    tok.eos_token = tok.bos_token = ours.eod_token
    tok.model_max_length = 10**30
    tok.save_pretrained(out_dir)
    return ours.eod


def export_to_hf(
    load_dir: str,
    save_dir: str,
    iteration: Optional[int] = None,
    dtype: str = "float32",
    tokenizer_model: Optional[str] = None,
    force: bool = False,
    max_shard_size: str = "5GB",
) -> dict:
    """Export a checkpoint to the HF folder `save_dir`. Returns a summary dict."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    save_dir = os.path.abspath(save_dir.rstrip("/"))
    if os.path.exists(save_dir) and not force:
        raise ExportError(f"save_dir {save_dir} exists; pass force=True to replace it")
    if tokenizer_model is not None and not os.path.exists(tokenizer_model):
        raise ExportError(f"tokenizer_model {tokenizer_model}: no such file")
    cfg, full, iteration = read_checkpoint(load_dir, iteration)
    state, _ = megatron_to_hf(full, cfg)
    del full
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: HF restores it from the input embedding
    elif cfg.arch == "gpt-neox" and "lm_head.weight" in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")  # the name every version loads
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}

    parent = os.path.dirname(save_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".tmp-", dir=parent)
    try:
        eos = write_tokenizer(tokenizer_model, tmp, cfg.vocab_size) if tokenizer_model else None
        write_weights(state, tmp, max_shard_size)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_dict(cfg, eos, dtype), f, indent=2, sort_keys=True)
        # The pause token is an input only: generate never picks it.
        suppress = [cfg.pause_token_id] if cfg.pause_token_id is not None else None
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                         suppress_tokens=suppress).save_pretrained(tmp)
        if is_latent(cfg):
            shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE),
                            os.path.join(tmp, MODELING_FILE))
        with open(os.path.join(tmp, "megatron_export.json"), "w") as f:
            json.dump({"load": os.path.abspath(load_dir), "iteration": iteration, "dtype": dtype,
                       "model_config": cfg.to_dict()}, f, indent=2)
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(save_dir):
            old = tempfile.mkdtemp(prefix=os.path.basename(save_dir) + ".old-", dir=parent)
            os.rename(save_dir, os.path.join(old, "x"))
        os.rename(tmp, save_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"save": save_dir, "arch": cfg.arch, "method": cfg.latent.method,
            "num_latent_thoughts": cfg.latent.num_latent_thoughts,
            "iteration": iteration, "parameters": sum(t.numel() for t in state.values()),
            "remote_code": is_latent(cfg), "tokenizer": tokenizer_model is not None}
