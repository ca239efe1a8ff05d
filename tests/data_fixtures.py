"""Tiny tokenizers and corpora built inside tests (no network, nothing from ../shared)."""

import gzip
import json
import os
import random

import zstandard

EOD = "<|endoftext|>"

_WORDS = (
    "the model thinks in continuous space before it speaks a token latent thoughts are hidden "
    "states fed back as inputs pile corpus documents train megatron data parallel pipeline "
    "tensor rank gradient loss jacobi iteration causal mask position rotary embedding"
).split()


def make_texts(n, seed=0, min_words=3, max_words=40):
    """Deterministic small documents with punctuation, newlines, digits and some non-ASCII."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        if i % 3 == 0:
            words.insert(rng.randint(0, len(words)), "naïve café — ünïcode 東京")
        if i % 4 == 1:
            words.insert(rng.randint(0, len(words)), f"{rng.randint(0, 10**6)},\n\n")
        if i % 5 == 2:
            words.append("  trailing spaces\t")
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def train_hf_bpe(directory, vocab_size=400):
    """A byte-level BPE in `tokenizers` JSON form, GPT-2 style, with EOD as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_texts(300, seed=123), trainer=trainer)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def write_gpt2_files(directory, hf_tokenizer_json):
    """vocab.json + merges.txt (GPT-2 format) derived from a trained byte-level BPE."""
    with open(hf_tokenizer_json, encoding="utf-8") as f:
        model = json.load(f)["model"]
    vocab_file = os.path.join(directory, "vocab.json")
    merge_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(merge_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in model["merges"]:
            f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    return vocab_file, merge_file


def train_sentencepiece(directory, vocab_size=500):
    """A lossless sentencepiece BPE model (identity normalisation, byte fallback, no dummy prefix),
    so detokenize(tokenize(text)) == text exactly."""
    import sentencepiece as spm

    prefix = os.path.join(directory, "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(300, seed=7)),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        eos_id=2,
        minloglevel=2,
    )
    return prefix + ".model"


def write_jsonl(path, texts, key="text", extra_lines=None):
    """JSONL (compressed by suffix: .zst, .gz). `extra_lines`: {index: raw bytes} inserted before
    the given document index, for bad-input cases."""
    extra_lines = extra_lines or {}
    lines = []
    for i, text in enumerate(texts):
        if i in extra_lines:
            lines.append(extra_lines[i])
        lines.append(json.dumps({key: text, "meta": {"i": i}}, ensure_ascii=i % 2 == 0).encode())
    data = b"\n".join(lines) + b"\n"
    write_bytes(path, data)
    return path


def write_bytes(path, data):
    if path.endswith(".zst"):
        # block flushes every 4 KiB, as a large streamed file has blocks every 128 KiB: a cut file
        # then still holds decodable blocks before the cut
        comp = zstandard.ZstdCompressor(level=3).compressobj()
        pieces = []
        for start in range(0, len(data), 4096):
            pieces.append(comp.compress(data[start : start + 4096]))
            pieces.append(comp.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        data = b"".join(pieces) + comp.flush()
    elif path.endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
