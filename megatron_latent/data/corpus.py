"""Corpus readers: expand `--input`, stream lines out of plain/zstd/gzip files, turn lines into
documents or into `Problem`s (never silently dropped).

Formats: `.jsonl`/`.json` (one JSON object per line, text under the `--json-keys`), the same with
`.zst`/`.gz`, and `.txt`/`.txt.zst`/`.txt.gz` (one document per line, the line without its newline).
Everything streams in 1 MiB chunks; only the current line is held whole.
"""

import glob
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import zstandard

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.zst", ".txt.gz")
SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES
CHUNK = 1 << 20

# Problem kinds, in the order the summary prints them.
PROBLEM_KINDS = {
    "malformed-json": "line is not a JSON object",
    "missing-key": "JSON object lacks the key",
    "not-a-string": "value under the key is not a string",
    "non-utf8": "line is not valid UTF-8",
    "empty": "document has no non-whitespace text",
    "truncated": "compressed file ends mid-stream (last, unterminated line dropped)",
}


class InputError(ValueError):
    """Bad `inputs` (nothing matches, unknown suffix); the message names the path."""


@dataclass(frozen=True)
class Problem:
    kind: str
    path: str
    line: int
    detail: str

    def __str__(self):
        return f"{self.path}:{self.line}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one input file: bytes [start, end) of an uncompressed file (end None:
    to the end), whose first line is line number `first_line`. Compressed files are whole shards."""

    path: str
    start: int = 0
    end: Optional[int] = None
    first_line: int = 1


def is_compressed(path: str) -> bool:
    return path.endswith((".zst", ".gz"))


def is_text(path: str) -> bool:
    return path.endswith(TEXT_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files, globs and directories (searched recursively for supported suffixes) -> sorted,
    de-duplicated file list, in the order the arguments were given."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if name.endswith(SUFFIXES)
            )
            if not found:
                raise InputError(f"inputs {item}: directory holds no {'/'.join(SUFFIXES)} files")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"inputs {item}: no such file, directory or matching glob")
        for path in found:
            if not path.endswith(SUFFIXES):
                raise InputError(f"inputs {path}: unsupported suffix (supported: {SUFFIXES})")
            if path not in files:
                files.append(path)
    return files


def _raw_chunks(path: str, start: int, end: Optional[int], progress) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            data = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            progress(len(data))
            yield data


class _Truncated(Exception):
    pass


def _decompressed_chunks(path: str, progress) -> Iterator[bytes]:
    """Decompress frame by frame (zstd) or member by member (gzip) and notice a stream that stops
    mid-frame: the stock stream readers return the partial data without complaint."""
    zst = path.endswith(".zst")

    def new():
        return zstandard.ZstdDecompressor().decompressobj() if zst else zlib.decompressobj(31)

    decomp, pending = new(), False  # pending: bytes fed into a frame that has not ended yet
    for data in _raw_chunks(path, 0, None, progress):
        while data:
            try:
                out = decomp.decompress(data)
            except (zstandard.ZstdError, zlib.error) as err:
                raise _Truncated(f"corrupt compressed data: {err}") from err
            pending = True
            if out:
                yield out
            if decomp.eof:
                data, decomp, pending = decomp.unused_data, new(), False
            else:
                data = b""
    if pending:
        raise _Truncated("compressed stream ends mid-frame")


def iter_lines(shard: Shard, progress=lambda n: None) -> Iterator[Tuple[int, bytes, Optional[str]]]:
    """Yield (line number, line bytes without newline, error) for every line of the shard; error
    is None except for the last item of a compressed stream that stops early or is corrupt: then
    it is the reason and the bytes are the unterminated rest. `progress(n)` gets raw bytes read."""
    if is_compressed(shard.path):
        chunks = _decompressed_chunks(shard.path, progress)
    else:
        chunks = _raw_chunks(shard.path, shard.start, shard.end, progress)
    lineno, tail = shard.first_line, b""
    try:
        for chunk in chunks:
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                yield lineno, line, None
                lineno += 1
    except _Truncated as err:
        yield lineno, tail, str(err)
        return
    if tail:
        yield lineno, tail, None


def parse_line(
    path: str, lineno: int, line: bytes, keys: Sequence[str], text_file: bool
) -> Tuple[Optional[List[str]], Optional[Problem]]:
    """One line -> (texts, one per key) or a Problem. Empty documents are Problems too."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, Problem("non-utf8", path, lineno, f"invalid byte at column {err.start + 1}")
    if text_file:
        texts = [decoded[:-1] if decoded.endswith("\r") else decoded]
    else:
        try:
            record = json.loads(decoded)
        except ValueError as err:
            return None, Problem("malformed-json", path, lineno, str(err))
        if not isinstance(record, dict):
            return None, Problem("malformed-json", path, lineno, f"a {type(record).__name__}, not an object")
        texts = []
        for key in keys:
            if key not in record:
                return None, Problem("missing-key", path, lineno, f"no key {key!r}")
            if not isinstance(record[key], str):
                kind = type(record[key]).__name__
                return None, Problem("not-a-string", path, lineno, f"{key!r} is a {kind}")
            texts.append(record[key])
    for key, text in zip(keys, texts):
        if not text.strip():
            return None, Problem("empty", path, lineno, f"{key!r} holds no text")
    return texts, None


def make_shards(files: Sequence[str], partitions: int) -> List[List[Shard]]:
    """Split the input into `partitions` contiguous groups of shards, balanced by bytes, so the
    concatenated outputs are in input order. Uncompressed files are cut at line starts when there
    are fewer files than partitions; compressed files cannot be cut (no seeking into a stream)."""
    sizes = [os.path.getsize(p) for p in files]
    total = sum(sizes)
    pieces: List[Tuple[Shard, int]] = []
    for path, size in zip(files, sizes):
        cuts = 1
        if partitions > len(files) and not is_compressed(path) and total:
            cuts = max(1, round(partitions * size / total))
        pieces.extend(_cut_file(path, size, cuts))
    groups: List[List[Shard]] = [[] for _ in range(partitions)]
    done, total = 0, sum(n for _, n in pieces) or 1
    for shard, nbytes in pieces:
        # a piece goes to the group its byte midpoint falls in: contiguous, roughly balanced
        group = min(partitions - 1, int(partitions * (done + nbytes / 2) / total))
        groups[group].append(shard)
        done += nbytes
    return groups


def _cut_file(path: str, size: int, cuts: int) -> List[Tuple[Shard, int]]:
    if cuts <= 1:
        return [(Shard(path), size)]
    starts, lines_before = [0], [0]
    with open(path, "rb") as f:
        for k in range(1, cuts):
            target = size * k // cuts
            if target <= starts[-1]:
                continue
            f.seek(target - 1)  # a line starts right after a newline
            rest = f.readline()
            pos = target - 1 + len(rest)
            if pos >= size or pos <= starts[-1]:
                continue
            starts.append(pos)
        newlines, prev = 0, 0
        for pos in starts[1:]:
            f.seek(prev)
            remaining = pos - prev
            while remaining:
                data = f.read(min(CHUNK, remaining))
                newlines += data.count(b"\n")
                remaining -= len(data)
            lines_before.append(newlines)
            prev = pos
    ends = starts[1:] + [size]
    return [
        (Shard(path, s, e, 1 + n), e - s) for s, e, n in zip(starts, ends, lines_before)
    ]
