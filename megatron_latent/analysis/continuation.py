"""Greedy continuation from a Hugging Face export, to check it against megatron's generation."""

from __future__ import annotations

from typing import List, Sequence


def hf_greedy_ids(hf_dir: str, prompt_ids: Sequence[int], max_new_tokens: int) -> List[int]:
    """The new token ids of greedy `generate()` from the export in `hf_dir` (our modeling file for
    N >= 1: trust_remote_code=True), in float32 on the CPU."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()
