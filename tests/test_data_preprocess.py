"""Tokenizers and preprocessing: round trips through megatron's IndexedDataset, identical output
for any workers/partitions, the CLI."""

import os
import subprocess
import sys

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from data_fixtures import EOD, make_texts, train_hf_bpe, train_sentencepiece, write_bytes, write_gpt2_files, write_jsonl
from megatron_latent.data import indexed
from megatron_latent.data.preprocess import PreprocessConfig, preprocess
from megatron_latent.data.tokenizer import TokenizerError, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    hf = train_hf_bpe(d)
    vocab, merges = write_gpt2_files(d, hf)
    return {"hf": hf, "vocab": vocab, "merges": merges, "sp": train_sentencepiece(d)}


def make_tokenizer(kind, files):
    if kind == "HuggingFaceTokenizer":
        return build_tokenizer(kind, files["hf"])
    if kind == "GPT2BPETokenizer":
        return build_tokenizer(kind, vocab_file=files["vocab"], merge_file=files["merges"])
    return build_tokenizer(kind, files["sp"])


@pytest.mark.parametrize("kind", ["HuggingFaceTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer"])
def test_round_trip_through_indexed_dataset(kind, tok_files, tmp_path):
    tok = make_tokenizer(kind, tok_files)
    texts = make_texts(120)
    write_jsonl(str(tmp_path / "a.jsonl.zst"), texts[:70])
    write_jsonl(str(tmp_path / "b.jsonl.gz"), texts[70:])
    prefix = str(tmp_path / "out")
    stats = preprocess(PreprocessConfig([str(tmp_path)], prefix, append_eod=True, progress=False), tok)
    assert (stats.documents_read, stats.documents_written, stats.skipped) == (120, 120, 0)
    ds = IndexedDataset(prefix + "_text_document")
    assert len(ds) == 120 and ds.index.dtype == numpy.uint16
    total = 0
    for i, text in enumerate(texts):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert ids[:-1].tolist() == tok.tokenize(text)
        assert tok.detokenize(ids[:-1]) == text
        total += len(ids)
    assert stats.tokens == total
    assert indexed.verify(prefix + "_text_document", tok.vocab_size) == []
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_gpt2_bpe_matches_transformers_reference(tok_files):
    from transformers import GPT2Tokenizer  # the pure-Python reference implementation

    ref = GPT2Tokenizer(tok_files["vocab"], tok_files["merges"])
    tok = make_tokenizer("GPT2BPETokenizer", tok_files)
    for text in make_texts(40, seed=3):
        assert tok.tokenize(text) == ref.encode(text)
    assert tok.eod == ref.convert_tokens_to_ids(EOD) and tok.vocab_size == len(ref)


def test_eod_comes_from_the_tokenizer(tok_files, tmp_path):
    tok = make_tokenizer("HuggingFaceTokenizer", tok_files)
    assert (tok.eod_token, tok.eod) == (EOD, 0)
    # a folder with tokenizer_config.json: its eos_token wins
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(open(tok_files["hf"]).read())
    (folder / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|endoftext|>"}}')
    tok2 = build_tokenizer("HuggingFaceTokenizer", str(folder))
    assert tok2.eod == 0 and "tokenizer_config" in tok2.eod_source
    # a tokenizer without any end-of-document token: one clear error naming the file
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(TokenizerError, match="bare.json: no end-of-document token"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "bare.json"))
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "bare.json"), eod_token="a").eod == 0
    with pytest.raises(TokenizerError, match="missing.json: no such tokenizer file"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing.json"))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_workers_and_partitions_give_identical_output(tok_files, tmp_path):
    tok = make_tokenizer("HuggingFaceTokenizer", tok_files)
    texts = make_texts(300, seed=5)
    inputs = [write_jsonl(str(tmp_path / "x.jsonl.zst"), texts[:100]),
              write_jsonl(str(tmp_path / "y.jsonl"), texts[100:], extra_lines={50: b"not json"})]
    outs = {}
    for workers, partitions in ((1, 1), (2, 1), (2, 3)):
        prefix = str(tmp_path / f"w{workers}p{partitions}")
        stats = preprocess(PreprocessConfig(inputs, prefix, append_eod=True, workers=workers,
                                            partitions=partitions, progress=False), tok)
        assert (stats.documents_read, stats.documents_written, stats.skipped) == (301, 300, 1)
        assert open(prefix + "_skipped.tsv").read().splitlines()[1] == \
            f"{inputs[1]}\t51\tmalformed-json\tExpecting value: line 1 column 1 (char 0)"
        outs[workers, partitions] = [_read(prefix + "_text_document" + s) for s in (".bin", ".idx")]
    assert outs[1, 1] == outs[2, 1] == outs[2, 3]


def test_uncompressed_file_is_cut_at_line_starts(tmp_path):
    from megatron_latent.data import corpus

    lines = [f'{{"text": "document {i}"}}'.encode() for i in range(1000)]
    path = str(tmp_path / "big.jsonl")
    write_bytes(path, b"\n".join(lines) + b"\n")
    groups = corpus.make_shards([path], 4)
    seen = [(n, line) for g in groups for s in g for n, line, _ in corpus.iter_lines(s)]
    assert len(groups) == 4 and all(groups)
    assert seen == [(i + 1, line) for i, line in enumerate(lines)]


def test_txt_inputs_and_multiple_keys(tok_files, tmp_path):
    tok = make_tokenizer("HuggingFaceTokenizer", tok_files)
    write_bytes(str(tmp_path / "a.txt.zst"), "first line\nsecond, café\n\nlast".encode())
    prefix = str(tmp_path / "t")
    stats = preprocess(PreprocessConfig([str(tmp_path / "*.txt.zst")], prefix, progress=False), tok)
    ds = IndexedDataset(prefix + "_text_document")
    assert [tok.detokenize(ds[i]) for i in range(len(ds))] == ["first line", "second, café", "last"]
    assert stats.problems == {"empty": 1}
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text('{"text": "alpha beta", "title": "Alpha"}\n{"text": "gamma", "title": "G"}\n')
    stats = preprocess(PreprocessConfig([str(jsonl)], prefix, json_keys=["text", "title"],
                                        append_eod=True, progress=False), tok)
    title = IndexedDataset(prefix + "_title_document")
    assert [tok.detokenize(title[i][:-1]) for i in range(2)] == ["Alpha", "G"]
    assert stats.outputs == [prefix + "_text_document", prefix + "_title_document"]


def test_compact_builder_writes_what_megatron_builder_writes(tmp_path):
    rng = numpy.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(200)]
    stock = IndexedDatasetBuilder(str(tmp_path / "stock.bin"), dtype=numpy.uint16)
    for d in docs:
        stock.add_document(numpy.array(d + [7]), [len(d) + 1])
    stock.finalize(str(tmp_path / "stock.idx"))
    ours = indexed.CompactIndexedDatasetBuilder(str(tmp_path / "ours.bin"), dtype=numpy.uint16)
    ours.add_documents(docs[:120], eod=7)
    ours.add_documents(docs[120:], eod=7)
    ours.finalize(str(tmp_path / "ours.idx"))
    for suffix in (".bin", ".idx"):
        assert _read(str(tmp_path / ("stock" + suffix))) == _read(str(tmp_path / ("ours" + suffix)))
    # Our reader parses what megatron's reader parses.
    index, stock = indexed.read_index(str(tmp_path / "stock.idx")), IndexedDataset(str(tmp_path / "stock"))
    assert index.dtype is numpy.uint16
    assert numpy.array_equal(index.sequence_lengths, stock.sequence_lengths)
    assert numpy.array_equal(index.sequence_pointers, stock.index.sequence_pointers)
    assert numpy.array_equal(index.document_indices, stock.document_indices)


@pytest.mark.parametrize("vocab", [None, 100, 65499, 65500, 200000])
def test_token_dtype_is_megatrons(vocab):
    assert indexed.optimal_dtype(vocab) is DType.optimal_dtype(vocab)


def test_cli_end_to_end(tok_files, tmp_path):
    texts = make_texts(30)
    write_jsonl(str(tmp_path / "c.jsonl"), texts, extra_lines={4: b'{"meta": 1}'})
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
           "--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "cli"),
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tok_files["vocab"],
           "--merge-file", tok_files["merges"], "--append-eod", "--workers", "2", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "read 31 documents from 1 file(s)" in run.stderr and "wrote 30; skipped 1" in run.stderr
    assert f"{tmp_path / 'c.jsonl'}:5: missing-key: no key 'text'" in run.stderr
    assert "EOD '<|endoftext|>' = id 0" in run.stderr
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 30
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nope*.jsonl")] + cmd[4:], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == \
        f"error: --input {tmp_path / 'nope*.jsonl'}: no such file, directory or matching glob"
