"""Bad input loses nothing and hides nothing: every bad line is counted and named; --strict stops;
interrupted runs never leave a .bin/.idx pair that looks complete."""

import os
import zlib

import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_fixtures import make_texts, train_hf_bpe, write_bytes, write_jsonl
from megatron_latent.data import preprocess as pp
from megatron_latent.data.preprocess import PreprocessConfig, PreprocessError, format_summary, preprocess
from megatron_latent.data.tokenizer import build_tokenizer

BAD = {
    2: b'{"text": "unterminated',
    5: b'{"title": "no text key"}',
    7: b'{"text": "caf\xe9 in latin-1"}',
    9: b'{"text": "   \\n\\t"}',
    11: b'{"text": 42}',
    13: b'["a", "list"]',
}
# 1-based line numbers of the inserted lines: each one sits before document `i`, after i + its
# predecessors among the bad lines.
EXPECTED = [
    (3, "malformed-json", "Unterminated string starting at: line 1 column 10 (char 9)"),
    (7, "missing-key", "no key 'text'"),
    (10, "non-utf8", "invalid byte at column 14"),
    (13, "empty", "'text' holds no text"),
    (16, "not-a-string", "'text' is a int"),
    (19, "malformed-json", "a list, not an object"),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer("HuggingFaceTokenizer", train_hf_bpe(str(tmp_path_factory.mktemp("t"))))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_bad_lines_are_counted_named_and_skipped(tok, tmp_path, suffix):
    texts = make_texts(20)
    path = write_jsonl(str(tmp_path / ("in" + suffix)), texts, extra_lines=BAD)
    prefix = str(tmp_path / "out")
    stats = preprocess(PreprocessConfig([path], prefix, append_eod=True, progress=False), tok)
    assert (stats.documents_read, stats.documents_written, stats.skipped) == (26, 20, 6)
    assert stats.problems == {"malformed-json": 2, "missing-key": 1, "non-utf8": 1, "empty": 1,
                              "not-a-string": 1}
    rows = open(prefix + "_skipped.tsv", encoding="utf-8").read().splitlines()
    assert rows[0] == "file\tline\tkind\tdetail"
    assert rows[1:] == [f"{path}\t{n}\t{kind}\t{detail}" for n, kind, detail in EXPECTED]
    summary = format_summary(stats, tok)
    assert "read 26 documents from 1 file(s)" in summary and "wrote 20; skipped 6" in summary
    assert f"    {path}:10: non-utf8: invalid byte at column 14" in summary
    assert "  skipped 2 x malformed-json: line is not a JSON object" in summary
    ds = IndexedDataset(prefix + "_text_document")
    assert [tok.detokenize(ds[i][:-1]) for i in range(len(ds))] == texts


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tok, tmp_path):
    path = write_jsonl(str(tmp_path / "in.jsonl"), make_texts(20), extra_lines=BAD)
    prefix = str(tmp_path / "out")
    message = f"{path}:3: malformed-json: Unterminated string starting at: line 1 column 10 " \
              "(char 9) (fatal because of strict=True)"
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig([path], prefix, strict=True, progress=False), tok)
    assert str(err.value) == message
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    # the same in a partition worker process: the error crosses the process boundary unchanged
    with pytest.raises(PreprocessError) as err:
        preprocess(PreprocessConfig([path, path], prefix, strict=True, workers=2, partitions=2,
                                    progress=False), tok)
    assert str(err.value) == message
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_truncated_compressed_file(tok, tmp_path, suffix):
    texts = make_texts(400, seed=9)
    full = str(tmp_path / ("full.jsonl" + suffix))
    write_jsonl(full, texts)
    data = open(full, "rb").read()
    cut = data[: len(data) * 2 // 3]
    path = str(tmp_path / ("cut.jsonl" + suffix))
    with open(path, "wb") as f:
        f.write(cut)
    # what survives: the complete lines of the decompressible part
    if suffix == ".zst":
        partial = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    else:
        partial = zlib.decompressobj(31).decompress(cut)
    complete = partial.count(b"\n")
    assert 0 < complete < 400
    prefix = str(tmp_path / "out")
    stats = preprocess(PreprocessConfig([path], prefix, progress=False), tok)
    assert stats.documents_written == complete and stats.problems == {"truncated": 1}
    row = open(prefix + "_skipped.tsv").read().splitlines()[1].split("\t")
    assert row[:3] == [path, str(complete + 1), "truncated"]
    ds = IndexedDataset(prefix + "_text_document")
    assert [tok.detokenize(ds[i]) for i in range(len(ds))] == texts[:complete]
    with pytest.raises(PreprocessError, match=f"cut.jsonl{suffix}:{complete + 1}: truncated"):
        preprocess(PreprocessConfig([path], prefix + "2", strict=True, progress=False), tok)


class _Interrupting:
    """Wraps a tokenizer; raises KeyboardInterrupt at the given batch, after checking that only
    temporary names exist on disk while the run is in flight."""

    def __init__(self, tok, folder, at_batch):
        self.tok, self.folder, self.at_batch, self.calls = tok, folder, at_batch, 0
        self.eod, self.vocab_size = tok.eod, tok.vocab_size
        self.check_names = True

    def tokenize_batch(self, texts, num_threads=1):
        self.calls += 1
        names = os.listdir(self.folder)
        assert "out_text_document.tmp.bin" in names
        assert "out_text_document.idx" not in names or not self.check_names
        if self.calls == self.at_batch:
            raise KeyboardInterrupt
        return self.tok.tokenize_batch(texts, num_threads)


def test_interrupted_run_leaves_no_complete_looking_pair(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BATCH_TEXT_BYTES", 2000)  # many batches from a small input
    path = write_jsonl(str(tmp_path / "in.jsonl"), make_texts(200))
    prefix = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig([path], prefix, progress=False), _Interrupting(tok, tmp_path, 3))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    # an interrupted re-run keeps the earlier complete output as it was
    preprocess(PreprocessConfig([path], prefix, progress=False), tok)
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}
    interrupting = _Interrupting(tok, tmp_path, 2)
    interrupting.check_names = False
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig([path], prefix, progress=False), interrupting)
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == before


def test_publish_removes_the_old_index_first(tmp_path):
    from megatron_latent.data import indexed

    final, tmp = str(tmp_path / "d"), str(tmp_path / "d.tmp")
    for prefix, content in ((final, b"old"), (tmp, b"new")):
        for suffix in (".bin", ".idx"):
            write_bytes(prefix + suffix, content + suffix.encode())
    events = []
    real_replace = os.replace

    def spy(src, dst):
        events.append((os.path.basename(src), os.path.basename(dst), os.path.exists(final + ".idx")))
        real_replace(src, dst)

    os.replace = spy
    try:
        indexed.publish(tmp, final)
    finally:
        os.replace = real_replace
    # while the new .bin replaces the old one, no .idx exists: no mismatched pair is ever visible
    assert events == [("d.tmp.bin", "d.bin", False), ("d.tmp.idx", "d.idx", False)]
    assert open(final + ".bin", "rb").read() == b"new.bin"
    assert open(final + ".idx", "rb").read() == b"new.idx"
