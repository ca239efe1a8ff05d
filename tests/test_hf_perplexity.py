"""tools/perplexity.py on an exported latent folder: a text file and the same tokens as a megatron
indexed dataset give the perplexity computed directly from the model's logits."""

import importlib.util
import math
import os

import pytest
import torch

from tiny import latent_model, save, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(argv):
    spec = importlib.util.spec_from_file_location("perplexity_tool", os.path.join(ROOT, "tools", "perplexity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _parse(out):
    f = [line for line in out.splitlines() if line.startswith("tokens ")][-1].split()
    return int(f[1]), float(f[3]), float(f[5])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, single_rank):
    from data_fixtures import make_texts, train_hf_bpe
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer
    from megatron_latent.hf.export import export_to_hf

    root = tmp_path_factory.mktemp("ppl")
    tok_path = train_hf_bpe(str(root))
    tok = HuggingFaceTokenizer(tok_path)
    cfg = small_config("gpt2", 1, vocab_size=tok.vocab_size)
    save(latent_model(cfg), cfg, str(root / "ckpt"))
    export_to_hf(str(root / "ckpt"), str(root / "hf"), tokenizer_model=tok_path)
    text = " ".join(make_texts(6, seed=9))
    (root / "text.txt").write_text(text, encoding="utf-8")
    return root, tok, tok.tokenize(text)


def _direct(hf_dir, tokens, seq, **kw):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    nll, count = 0.0, 0
    for i in range(0, len(tokens), seq):
        w = torch.tensor([tokens[i : i + seq]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = model(w, **kw).logits.log_softmax(-1)[0]
        nll -= sum(logp[j - 1, w[0, j]].item() for j in range(1, w.shape[1]))
        count += w.shape[1] - 1
    return count, nll / count


def test_text_file_and_indexed_dataset(folder, capsys):
    from megatron_latent.data.indexed import CompactIndexedDatasetBuilder

    root, tok, tokens = folder
    hf = str(root / "hf")
    count, nll = _direct(hf, tokens, 16)
    assert _tool(["--hf-dir", hf, "--text-file", str(root / "text.txt"),
                  "--seq-length", "16", "--batch-size", "3"]) == 0
    t, n, p = _parse(capsys.readouterr().out)
    assert t == count and abs(n - nll) < 1e-5 and abs(p - math.exp(nll)) < 1e-3 * p
    # The same tokens as a two-document indexed dataset (the stream is the documents back to back).
    prefix = str(root / "data_text_document")
    builder = CompactIndexedDatasetBuilder(prefix + ".bin")
    builder.add_documents([tokens[:40], tokens[40:]])
    builder.finalize(prefix + ".idx")
    assert _tool(["--hf-dir", hf, "--data-path", prefix, "--seq-length", "16", "--no-progress"]) == 0
    assert _parse(capsys.readouterr().out)[:2] == pytest.approx((count, nll), abs=1e-5)
    # Exact thoughts instead of J=3 Jacobi: another number, the direct one.
    count, nll = _direct(hf, tokens[:50], 16, latent_prefill="exact")
    assert _tool(["--hf-dir", hf, "--data-path", prefix, "--seq-length", "16", "--max-tokens", "50",
                  "--latent-prefill", "exact"]) == 0
    assert _parse(capsys.readouterr().out)[:2] == pytest.approx((count, nll), abs=1e-5)


def test_bad_input(folder, capsys):
    root, _, _ = folder
    for argv, msg in ((["--hf-dir", str(root), "--text-file", "x"], "no config.json"),
                      (["--hf-dir", str(root / "hf"), "--text-file", str(root / "nope.txt")], "--text-file"),
                      (["--hf-dir", str(root / "hf"), "--data-path", str(root / "nope")], "--data-path")):
        assert _tool(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err, err
