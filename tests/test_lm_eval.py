"""lm-evaluation-harness `--model hf` on an exported model of every method (latent and interpolated
thoughts, pause tokens, extra loops, PonderLM): a local multiple-choice task (YAML + JSONL written here, no
downloads) runs, and its log-likelihoods are the model's own."""

import json
import os

import pytest
import torch

from tiny import latent_model, save, small_config

TASK = "latent_local_mc"


def _write_task(root, docs):
    data = os.path.join(root, "docs.jsonl")
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with open(os.path.join(root, f"{TASK}.yaml"), "w") as f:
        f.write(
            f"task: {TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{query}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold}}"\n'
            "metric_list:\n  - metric: acc\n"
        )


def _loglikelihood(model, tok, context, continuation):
    """lm-eval's split: the continuation's tokens are those of context + continuation after the
    context's tokens; their log-probabilities summed."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


METHODS = {"latent": (1, {}), "interpolated": (1, dict(thought_input="interpolated")),
           "pause": (0, dict(num_pause_tokens=2, scale_embeddings=True)),
           "loop": (0, dict(num_extra_loops=1, scale_embeddings=True)),
           "ponder": (0, dict(num_ponder_steps=2))}


# PonderLM's export is checked against ours in test_hf_methods; its lm-eval run is the slow suite's.
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "ponder" else m for m in METHODS])
def test_lm_eval_hf_model_on_exported_latent(tmp_path, single_rank, monkeypatch, method):
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from data_fixtures import make_texts, train_hf_bpe
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer
    from megatron_latent.hf.export import export_to_hf

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok_path = train_hf_bpe(str(tmp_path))
    n, kw = METHODS[method]
    cfg = small_config("llama", n, vocab_size=HuggingFaceTokenizer(tok_path).vocab_size, seq_length=64, **kw)
    assert cfg.latent.method == method
    save(latent_model(cfg), cfg, str(tmp_path / "ckpt"))
    hf_dir = str(tmp_path / "hf")
    export_to_hf(str(tmp_path / "ckpt"), hf_dir, tokenizer_model=tok_path)

    texts = make_texts(8, seed=5, min_words=3, max_words=8)
    docs = [{"query": texts[i], "choices": ["the model thinks", "latent rank", "pipeline gradient loss"], "gold": i % 3}
            for i in range(6)]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    _write_task(str(task_dir), docs)
    res = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), batch_size=4, device="cpu",
        log_samples=True,
    )
    samples = res["samples"][TASK]
    assert len(samples) == len(docs)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    correct = 0
    for s in samples:
        doc = docs[s["doc_id"]]
        ours = [_loglikelihood(model, tok, doc["query"], " " + c) for c in doc["choices"]]
        theirs = [r[0][0] for r in s["resps"]]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (ours, theirs)
        correct += int(max(range(3), key=lambda i: ours[i]) == doc["gold"])
    assert res["results"][TASK]["acc,none"] == correct / len(docs)
