"""The quickstart's corpus and tokenizer (data/pycorpus.py): the standard library's docstrings and
sources as documents, written as a corpus and trained into a byte-level BPE tokenizer."""

import json
import os

from megatron_latent.data.pycorpus import (
    EOD_TOKEN,
    stdlib_documents,
    stdlib_files,
    stdlib_root,
    train_bpe_tokenizer,
    write_stdlib_corpus,
)


def _fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "a.py").write_text('"""Module a.\n\n    Indented."""\n\ndef f():\n    """Function f."""\n    return 1\n')
    (root / "pkg" / "b.py").write_text("x = 1\n")  # no docstrings: the source only
    (root / "pkg" / "bad.py").write_bytes(b"s = '\xff'\n")  # not UTF-8: left out
    (root / "test" / "test_a.py").write_text('"""Skipped."""\n')
    (root / "notes.txt").write_text("not python")


def test_stdlib_documents_of_a_tree(tmp_path):
    _fake_stdlib(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in stdlib_files(str(tmp_path))] == ["a.py", "pkg/b.py", "pkg/bad.py"]
    docs = list(stdlib_documents(str(tmp_path)))
    assert [(d["meta"]["pile_set_name"], d["meta"]["path"]) for d in docs] == [
        ("python-stdlib-docstrings", "a.py"), ("python-stdlib-source", "a.py"), ("python-stdlib-source", "pkg/b.py")]
    assert docs[0]["text"] == "Module a.\n\nIndented.\n\nFunction f."
    assert docs[2]["text"] == "x = 1\n"


def test_write_stdlib_corpus_and_tokenizer(tmp_path):
    _fake_stdlib(tmp_path / "lib")
    out = tmp_path / "c.jsonl"
    stats = write_stdlib_corpus(str(out), root=str(tmp_path / "lib"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats == {"documents": 3, "docstring_documents": 1,
                     "bytes": sum(len(r["text"].encode()) for r in records)}
    assert sorted(r["text"] for r in records) == sorted(d["text"] for d in stdlib_documents(str(tmp_path / "lib")))
    # max_bytes keeps whole documents only, within the bound
    small = write_stdlib_corpus(str(out), max_bytes=20, root=str(tmp_path / "lib"))
    assert 0 < small["bytes"] <= 20 and small["documents"] < 3
    size, eod = train_bpe_tokenizer([str(out)], str(tmp_path / "tok.json"), vocab_size=300)
    from megatron_latent.data.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(tmp_path / "tok.json"))
    assert (eod, tok.eod_token, tok.vocab_size) == (EOD_TOKEN, EOD_TOKEN, size) and 257 <= size <= 300
    text = "def f():\n    return 'héllo'\n"
    assert tok.detokenize(tok.tokenize(text)) == text  # byte-level: every text round-trips


def test_the_installed_stdlib_is_found():
    rel = {os.path.relpath(p, stdlib_root()) for p in stdlib_files()}
    assert {"json/__init__.py", "os.py"} <= rel
    assert not any(p.startswith(("test/", "idlelib/", "site-packages/")) for p in rel)
