"""A real-text corpus every machine with Python has: the installed standard library's docstrings
(English prose) and sources, as Pile-style JSONL, and a byte-level BPE tokenizer trained on any
corpus on the spot. Used by the offline quickstart (examples/quickstart.sh).

The corpus is deterministic for one Python installation: files are read in sorted order, documents
are shuffled with a fixed seed (so a split by documents mixes modules instead of cutting the
alphabet), and `max_bytes` keeps a prefix of that order.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_latent.data.corpus import Shard, expand_inputs, is_text, iter_lines, parse_line

EOD_TOKEN = "<|endoftext|>"
# Not the library: tests (which include deliberately malformed files), bundled third-party code,
# the IDE, installed packages.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "lib2to3",
                 "__pycache__", "turtledemo", "ensurepip"}


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library sources."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: Optional[str] = None) -> List[str]:
    """Sorted paths of the library's .py files below `root`, without the skipped directories."""
    root = root or stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _docstrings(source: str) -> List[str]:
    """The module's, classes' and functions' docstrings in source order (none if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d.strip() for d in (ast.get_docstring(n, clean=True) for n in nodes) if d and d.strip()]


def stdlib_documents(root: Optional[str] = None) -> Iterator[Dict]:
    """Two documents per module: its docstrings joined by blank lines, and its source. Each is a
    Pile-style record {"text", "meta": {"pile_set_name", "path"}}; empty ones are left out."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a non-UTF-8 or unreadable file is no text for us
        rel = os.path.relpath(path, root)
        docs = "\n\n".join(_docstrings(source))
        if docs:
            yield {"text": docs, "meta": {"pile_set_name": "python-stdlib-docstrings", "path": rel}}
        if source.strip():
            yield {"text": source, "meta": {"pile_set_name": "python-stdlib-source", "path": rel}}


def write_stdlib_corpus(output: str, max_bytes: Optional[int] = None, seed: int = 1234,
                        root: Optional[str] = None) -> Dict[str, int]:
    """Write the shuffled documents (their first `max_bytes` of UTF-8 text, whole documents only)
    to `output` (JSONL), atomically. Returns {"documents", "bytes", "docstring_documents"}."""
    docs = list(stdlib_documents(root))
    if not docs:
        raise ValueError(f"{root or stdlib_root()}: no Python sources found for the corpus")
    random.Random(seed).shuffle(docs)
    stats = {"documents": 0, "bytes": 0, "docstring_documents": 0}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8") as f:
        for doc in docs:
            size = len(doc["text"].encode("utf-8"))
            if max_bytes is not None and stats["bytes"] + size > max_bytes:
                continue  # a smaller one later may still fit
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            stats["documents"] += 1
            stats["bytes"] += size
            stats["docstring_documents"] += doc["meta"]["pile_set_name"].endswith("docstrings")
    os.replace(output + ".tmp", output)
    return stats


def iter_texts(inputs: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """The documents of a corpus (files, globs, directories; JSONL or text, plain/zst/gz), as the
    preprocessing reads them; lines it would reject are skipped."""
    for path in expand_inputs(inputs):
        for lineno, line, error in iter_lines(Shard(path)):
            if error:
                continue
            texts, problem = parse_line(path, lineno, line, [json_key], is_text(path))
            if problem is None:
                yield texts[0]


def train_bpe_tokenizer(inputs: Sequence[str], output: str, vocab_size: int,
                        json_key: str = "text") -> Tuple[int, str]:
    """Train a byte-level BPE tokenizer (`tokenizers`) with the end-of-document token
    <|endoftext|> on the corpus; write its tokenizer.json to `output` atomically. Byte-level, so
    every text round-trips. Returns (vocabulary size, eod token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_texts(inputs, json_key), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tok.save(output + ".tmp")
    os.replace(output + ".tmp", output)
    return tok.get_vocab_size(), EOD_TOKEN
