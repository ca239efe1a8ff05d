"""Writing and checking megatron-core indexed datasets (`<prefix>.bin` + `<prefix>.idx`).

Writing goes through megatron-core's `IndexedDatasetBuilder` (so the format is megatron's own),
with two changes for Pile-sized runs: the per-document index lives in compact arrays (12 bytes a
document instead of ~70 for Python int lists) and the sequence pointers are computed with numpy
at finalize (the stock writer loops in Python and builds a list of all pointers). The files are
written under temporary names and renamed at the end, `.idx` last, so an interrupted run never
leaves a pair that looks complete.
"""

import os
from array import array
from dataclasses import dataclass

import numpy

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    _IndexReader,
    _IndexWriter,
)

TMP_SUFFIX = ".tmp"


class _NumpyIndexWriter(_IndexWriter):
    def _sequence_pointers(self, sequence_lengths):
        lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64)
        pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
        numpy.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
        return pointers


class CompactIndexedDatasetBuilder(IndexedDatasetBuilder):
    """`IndexedDatasetBuilder` with array-backed index lists; writes byte-identical files."""

    def __init__(self, bin_path: str, dtype=numpy.int32):
        super().__init__(bin_path, dtype=dtype)
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])

    def add_documents(self, token_lists, eod=None):
        """Append many single-sequence documents with one write (the hot path of preprocessing).
        `eod`, when given, is appended to every document."""
        if not token_lists:
            return
        lengths = [len(t) + (eod is not None) for t in token_lists]
        flat = numpy.empty(sum(lengths), dtype=self.dtype)
        pos = 0
        for tokens, n in zip(token_lists, lengths):
            if eod is None:
                flat[pos : pos + n] = tokens
            else:
                flat[pos : pos + n - 1] = tokens
                flat[pos + n - 1] = eod
            pos += n
        self.data_file.write(flat.tobytes(order="C"))
        first = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(range(first + 1, first + 1 + len(lengths)))

    def add_index(self, path_prefix: str) -> None:
        index = _IndexReader(path_prefix + ".idx", multimodal=False)
        if index.dtype != self.dtype:
            raise ValueError(f"{path_prefix}.idx: dtype {index.dtype} differs from {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(numpy.asarray(index.sequence_lengths, dtype=numpy.int32))
        self.document_indices.extend((offset + index.document_indices[1:]).astype(numpy.int64))
        del index
        with open(path_prefix + ".bin", "rb") as f:
            while True:
                data = f.read(1 << 24)
                if not data:
                    break
                self.data_file.write(data)

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        with _NumpyIndexWriter(idx_path, self.dtype) as writer:
            writer.write(
                numpy.frombuffer(self.sequence_lengths, dtype=numpy.int32),
                None,
                numpy.frombuffer(self.document_indices, dtype=numpy.int64),
            )


def temporary_prefix(prefix: str) -> str:
    return prefix + TMP_SUFFIX


def publish(tmp_prefix: str, prefix: str) -> None:
    """Rename a finished temporary pair to its final names. The old `.idx` goes first and the new
    one arrives last: at every instant either no `.idx` exists or the complete new pair does."""
    if os.path.exists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")


def remove_pair(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


@dataclass
class DatasetSummary:
    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str
    bin_bytes: int
    min_length: int
    max_length: int
    mean_length: float


def summarize(prefix: str) -> DatasetSummary:
    index = _IndexReader(prefix + ".idx", multimodal=False)
    lengths = numpy.asarray(index.sequence_lengths, dtype=numpy.int64)
    return DatasetSummary(
        prefix=prefix,
        documents=len(index.document_indices) - 1,
        sequences=len(lengths),
        tokens=int(lengths.sum()),
        dtype=numpy.dtype(index.dtype).name,
        bin_bytes=os.path.getsize(prefix + ".bin"),
        min_length=int(lengths.min()) if len(lengths) else 0,
        max_length=int(lengths.max()) if len(lengths) else 0,
        mean_length=float(lengths.mean()) if len(lengths) else 0.0,
    )


def verify(prefix: str, vocab_size=None, max_scan_tokens: int = 1 << 31) -> list:
    """Integrity check of a `.bin`/`.idx` pair. Returns a list of problems (empty when sound):
    both files exist, the index parses, pointers are the running sum of lengths, document indices
    are increasing and end at the sequence count, the `.bin` size equals the indexed bytes, and
    (with `vocab_size`) every token id is below it (scanned in chunks, up to `max_scan_tokens`)."""
    errors = []
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            errors.append(f"{prefix}{suffix}: missing")
    if errors:
        return errors
    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except Exception as err:  # any parse failure is a finding, reported with the file name
        return [f"{prefix}.idx: unreadable index: {type(err).__name__}: {err}"]
    itemsize = DType.size(index.dtype)
    lengths = numpy.asarray(index.sequence_lengths, dtype=numpy.int64)
    pointers = numpy.asarray(index.sequence_pointers, dtype=numpy.int64)
    doc_idx = numpy.asarray(index.document_indices, dtype=numpy.int64)
    expected = numpy.concatenate([[0], numpy.cumsum(lengths * itemsize)])
    if (lengths < 0).any():
        errors.append(f"{prefix}.idx: negative sequence lengths")
    if not numpy.array_equal(pointers, expected[:-1]):
        errors.append(f"{prefix}.idx: sequence pointers are not the running sum of lengths")
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
        errors.append(f"{prefix}.idx: document indices do not span 0..{len(lengths)}")
    elif (numpy.diff(doc_idx) <= 0).any():
        errors.append(f"{prefix}.idx: document indices not strictly increasing (empty documents)")
    bin_bytes = os.path.getsize(prefix + ".bin")
    if bin_bytes != expected[-1]:
        errors.append(f"{prefix}.bin: {bin_bytes} bytes, the index describes {int(expected[-1])}")
    elif vocab_size is not None and expected[-1] > 0:
        data = numpy.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
        step = 1 << 24
        for start in range(0, min(len(data), max_scan_tokens), step):
            top = int(data[start : start + step].max())
            if top >= vocab_size:
                errors.append(f"{prefix}.bin: token id {top} >= vocab size {vocab_size}")
                break
        del data
    return errors


def open_dataset(prefix: str) -> IndexedDataset:
    return IndexedDataset(prefix, multimodal=False, mmap=True)
