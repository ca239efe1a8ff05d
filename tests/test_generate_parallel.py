"""KV-cached latent generation at TP=2 (spawned gloo ranks) equals TP=1: logits, greedy and
sampled tokens, Jacobi-to-tolerance iteration counts, for the three families (GQA included)."""

import torch

from multirank import run_on_ranks

PROMPTS = [[5, 17, 200, 3, 9], [44, 2], [130, 131, 7]]
SEQS = [[5, 17, 200, 3, 9, 1, 60], [44, 2, 249], [130, 131, 7, 8, 99]]


def _decode_all(tp):
    from megatron_latent.inference import PrefillParams, SamplingParams, decode_logits, generate
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from tiny import ARCHS, inference_model

    initialize_model_parallel(tp, 1)
    out = {}
    for arch in ARCHS:
        m = inference_model(arch, 1)
        exact = decode_logits(m, SEQS, decode_steps=2)
        tol = decode_logits(m, SEQS, decode_steps=2, prefill=PrefillParams("tolerance", tol=1e-6))
        greedy = generate(m, PROMPTS, 4)
        sampled = generate(m, PROMPTS, 4, sampling=SamplingParams(False, 1.5, top_k=50, top_p=0.95, seed=4))
        out[arch] = {
            "exact": exact.logits, "tol": tol.logits, "tol_iters": tol.prefill_iters,
            "greedy": greedy.ids, "sampled": sampled.ids,
            # Evidence that the model really is split: vocabulary rows and KV groups on this rank.
            "shard": (m.embedding.word_embeddings.weight.shape[0],
                      m.decoder.layers[0].self_attention.num_query_groups_per_partition),
        }
    return out


def test_tp2_equals_tp1():
    single = run_on_ranks(_decode_all, 1, 1)[0]
    for rank, got in enumerate(run_on_ranks(_decode_all, 2, 2)):
        assert got["llama"]["shard"] == (128, 1) and single["llama"]["shard"] == (256, 2)
        for arch, ref in single.items():
            g = got[arch]
            where = f"{arch} rank {rank}"
            torch.testing.assert_close(g["exact"], ref["exact"], rtol=1e-5, atol=1e-5, msg=where)
            torch.testing.assert_close(g["tol"], ref["tol"], rtol=1e-5, atol=1e-5, msg=where)
            assert g["tol_iters"] == ref["tol_iters"], where
            assert g["greedy"] == ref["greedy"], where
            assert g["sampled"] == ref["sampled"], where


def _decode_methods(tp):
    from megatron_latent.inference import SamplingParams, decode_logits, generate
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from tiny import inference_model

    initialize_model_parallel(tp, 1)
    out = {}
    for method, n, kw in (("interpolated", 1, dict(thought_input="interpolated", interpolation_topk=5)),
                          ("pause", 0, dict(num_pause_tokens=2)), ("loop", 0, dict(num_extra_loops=2)),
                          ("ponder", 0, dict(num_ponder_steps=2))):
        m = inference_model("llama", n, scale_embeddings=True, **kw)
        rows = m.token_vocab_size + 1  # the tokenizer's and (pause) the pause row; the padding differs by TP
        out[method] = {"exact": decode_logits(m, SEQS, decode_steps=2).logits[..., :rows],
                       "greedy": generate(m, PROMPTS, 4, sampling=SamplingParams(vocab_size=m.token_vocab_size)).ids}
    return out


def test_methods_tp2_equal_tp1():
    """Interpolated thoughts (the vocab-parallel softmax mix), pause tokens (the pause row looked
    up in a vocabulary-split embedding), extra loops (a cache per run) and PonderLM (a cache per
    forward, the vocab-parallel mix between) decode at TP=2 as at TP=1."""
    single = run_on_ranks(_decode_methods, 1, 1)[0]
    for rank, got in enumerate(run_on_ranks(_decode_methods, 2, 2)):
        for method, ref in single.items():
            where = f"{method} rank {rank}"
            torch.testing.assert_close(got[method]["exact"], ref["exact"], rtol=1e-5, atol=1e-5, msg=where)
            assert got[method]["greedy"] == ref["greedy"], where
