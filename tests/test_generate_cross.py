"""Greedy generation of an exported HF model equals megatron-side generation token for token, for
every family and N in {0, 1, 2}, with the exact and the Jacobi prefill, and for a left-padded batch."""

import pytest
import torch

from tiny import ARCHS, VOCAB, latent_model, save, small_config

NEW = 8


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, single_rank):
    import transformers

    from megatron_latent.hf.export import export_to_hf

    out = {}
    for arch in ARCHS:
        for n in (0, 1, 2):
            cfg = small_config(arch, n)
            root = tmp_path_factory.mktemp(f"{arch}{n}")
            model = latent_model(cfg)
            save(model, cfg, str(root / "ckpt"))
            export_to_hf(str(root / "ckpt"), str(root / "hf"))
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=n > 0).eval()
            out[(arch, n)] = (model, hf)
    return out


def _hf_generate(hf, prompts, **kw):
    """Left-padded HF greedy generation; the new tokens of each row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, width:].tolist()


def _prompts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [0, 1, 2])
def test_hf_generate_equals_megatron_generate(pairs, arch, n):
    from megatron_latent.inference import PrefillParams, SamplingParams, generate

    model, hf = pairs[(arch, n)]
    prompts = _prompts([6, 3, 5])
    ours = generate(model, prompts, NEW, sampling=SamplingParams(vocab_size=VOCAB), prefill=PrefillParams("exact")).ids
    ours = ours.tolist() if torch.is_tensor(ours) else ours
    theirs = _hf_generate(hf, prompts, **({"latent_prefill": "exact"} if n else {}))
    assert ours == theirs
    if n:
        # the Jacobi prefill with J iterations on both sides
        ours_j = generate(model, prompts[:1], NEW, sampling=SamplingParams(vocab_size=VOCAB),
                          prefill=PrefillParams("jacobi", jacobi_iters=2)).ids
        ours_j = ours_j.tolist() if torch.is_tensor(ours_j) else ours_j
        assert ours_j == _hf_generate(hf, prompts[:1], latent_prefill="jacobi", num_jacobi_iterations=2)
        # and the two paths' defaults are the same prefill (Jacobi at the model's evaluation J)
        ours_d = generate(model, prompts[:1], NEW, sampling=SamplingParams(vocab_size=VOCAB)).ids
        assert (ours_d.tolist() if torch.is_tensor(ours_d) else ours_d) == _hf_generate(hf, prompts[:1])
