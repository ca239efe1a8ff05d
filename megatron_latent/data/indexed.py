"""Writing and checking megatron-core indexed datasets (`<prefix>.bin` + `<prefix>.idx`).

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`, version 1): the `.bin` is
the token ids back to back; the `.idx` is a header (magic, version, dtype code, sequence and
document counts) and then the sequence lengths (int32), byte pointers (int64) and document
boundaries (int64). It is written and read here with numpy rather than through megatron's
`IndexedDatasetBuilder`: importing megatron-core costs ~2 s (its package imports all of
`tensor_parallel`) in every preprocessing process, its writer keeps Python lists of every document
(~70 bytes each, 12 here) and loops in Python at finalize, and its index reader is private. The
tests check byte-identical output against megatron's builder and read everything back with
megatron's `IndexedDataset`, which training uses (`open_dataset`).

Files are written under temporary names and renamed at the end, `.idx` last, so an interrupted
run never leaves a pair that looks complete.
"""

import os
import struct
from array import array
from dataclasses import dataclass
from typing import NamedTuple

import numpy

TMP_SUFFIX = ".tmp"

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
# megatron-core's DType codes.
_DTYPE_CODES = {numpy.uint8: 1, numpy.int8: 2, numpy.int16: 3, numpy.int32: 4, numpy.int64: 5,
                numpy.float64: 6, numpy.float32: 7, numpy.uint16: 8}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def optimal_dtype(vocab_size) -> type:
    """The token dtype megatron-core picks for a vocabulary (its `DType.optimal_dtype`)."""
    return numpy.uint16 if vocab_size is not None and vocab_size < 65500 else numpy.int32


class Index(NamedTuple):
    dtype: type
    sequence_lengths: numpy.ndarray  # int32, one per sequence
    sequence_pointers: numpy.ndarray  # int64 byte offsets into the .bin
    document_indices: numpy.ndarray  # int64, 0 then the end sequence of each document


def read_index(idx_path: str) -> Index:
    """Parse an `.idx` file; ValueError naming the file when it is not one."""
    with open(idx_path, "rb") as f:
        header = f.read(len(_MAGIC) + 8 + 1 + 8 + 8)
        data = f.read()
    if len(header) < 34 or header[:9] != _MAGIC:
        raise ValueError(f"{idx_path}: not a megatron indexed-dataset index (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
    if version != _VERSION or code not in _CODE_DTYPES:
        raise ValueError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
    sizes = (4 * sequences, 8 * sequences, 8 * documents)
    if len(data) < sum(sizes):
        raise ValueError(f"{idx_path}: truncated ({len(data)} bytes after the header, {sum(sizes)} expected)")
    lengths = numpy.frombuffer(data, numpy.int32, sequences, 0)
    pointers = numpy.frombuffer(data, numpy.int64, sequences, sizes[0])
    docs = numpy.frombuffer(data, numpy.int64, documents, sizes[0] + sizes[1])
    return Index(_CODE_DTYPES[code], lengths, pointers, docs)


class CompactIndexedDatasetBuilder:
    """Writes what megatron-core's `IndexedDatasetBuilder` writes, for single-sequence documents,
    keeping the index in compact arrays."""

    def __init__(self, bin_path: str, dtype=numpy.int32):
        self.dtype = dtype
        self.data_file = open(bin_path, "wb")
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
        """Append a finished pair (a partition of the same run)."""
        index = read_index(path_prefix + ".idx")
        if index.dtype != self.dtype:
            raise ValueError(f"{path_prefix}.idx: dtype {index.dtype.__name__} differs from {self.dtype.__name__}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(index.sequence_lengths)
        self.document_indices.extend(offset + index.document_indices[1:])
        del index
        with open(path_prefix + ".bin", "rb") as f:
            while True:
                data = f.read(1 << 24)
                if not data:
                    break
                self.data_file.write(data)

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = numpy.frombuffer(self.sequence_lengths, dtype=numpy.int32)
        pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * numpy.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<QBQQ", _VERSION, _DTYPE_CODES[self.dtype], len(lengths), len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(numpy.frombuffer(self.document_indices, dtype=numpy.int64).tobytes(order="C"))


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
    index = read_index(prefix + ".idx")
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
        index = read_index(prefix + ".idx")
    except ValueError as err:  # the message names the file
        return [str(err)]
    itemsize = numpy.dtype(index.dtype).itemsize
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


def open_dataset(prefix: str):
    """megatron-core's `IndexedDataset` over a pair (what training reads)."""
    # Imported here: megatron-core's import costs ~2 s, which inspecting or preprocessing need not pay.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=True)
