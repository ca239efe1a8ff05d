"""The dataset inspector: counts, decoding, integrity checks that catch damaged files."""

import os
import subprocess
import sys

from data_fixtures import make_texts, train_hf_bpe, write_jsonl
from megatron_latent.data import indexed
from megatron_latent.data.preprocess import PreprocessConfig, preprocess
from megatron_latent.data.tokenizer import build_tokenizer

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                    "inspect_dataset.py")


def test_inspect_counts_decode_and_verify(tmp_path):
    hf = train_hf_bpe(str(tmp_path))
    tok = build_tokenizer("HuggingFaceTokenizer", hf)
    texts = make_texts(12)
    path = write_jsonl(str(tmp_path / "in.jsonl"), texts)
    prefix = str(tmp_path / "d")
    stats = preprocess(PreprocessConfig([path], prefix, append_eod=True, progress=False), tok)
    ds = prefix + "_text_document"
    summary = indexed.summarize(ds)
    assert (summary.documents, summary.tokens, summary.dtype) == (12, stats.tokens, "uint16")
    assert summary.bin_bytes == 2 * stats.tokens

    cmd = [sys.executable, TOOL, ds, "--verify", "--decode", "3",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"OK {ds}: .bin/.idx consistent, all ids < {tok.vocab_size}"
    assert lines[1].startswith(f"{ds}: 12 documents, 12 sequences, {stats.tokens:,} tokens (uint16")
    n3 = len(tok.tokenize(texts[3])) + 1
    assert lines[2] == f"--- document 3: {n3} tokens"
    assert "\n".join(lines[3:]) == texts[3] + "<|endoftext|>"

    # damage: a truncated .bin, then an out-of-vocabulary id
    data = open(ds + ".bin", "rb").read()
    with open(ds + ".bin", "wb") as f:
        f.write(data[:-2])
    assert indexed.verify(ds) == [f"{ds}.bin: {len(data) - 2} bytes, the index describes {len(data)}"]
    run = subprocess.run(cmd[:4], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout.startswith(f"FAIL {ds}.bin: {len(data) - 2} bytes")
    with open(ds + ".bin", "wb") as f:
        f.write(data[:-2] + (60000).to_bytes(2, "little"))
    assert indexed.verify(ds, vocab_size=tok.vocab_size) == \
        [f"{ds}.bin: token id 60000 >= vocab size {tok.vocab_size}"]
    os.remove(ds + ".idx")
    assert indexed.verify(ds) == [f"{ds}.idx: missing"]
