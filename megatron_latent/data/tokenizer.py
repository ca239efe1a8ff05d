"""Tokenizers behind one interface (megatron's: `vocab_size`, `eod`, `tokenize`, `detokenize`).

Three kinds, matching Megatron's `--tokenizer-type` names:

* `HuggingFaceTokenizer`: a `tokenizers` `tokenizer.json` file (or a folder holding one), e.g. the
  GPT-NeoX-20B tokenizer of Pythia. Loaded with the Rust `tokenizers` library only.
* `SentencePieceTokenizer`: a sentencepiece `.model` file.
* `GPT2BPETokenizer`: GPT-2 `vocab.json` + `merges.txt`, run by the same Rust BPE as HF's
  `GPT2TokenizerFast` (byte-level, GPT-2 regex, no prefix space).

The same objects serve preprocessing (`tokenize_batch`), training (`eod`, `vocab_size`, passed to
megatron-core's `GPTDatasetConfig`) and export. `unique_identifiers` feeds megatron-core's dataset
cache hash, so two different tokenizers never share cached sample indices.
"""

import json
import os
from collections import OrderedDict
from typing import List, Optional, Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer")

# Names tried, in order, when a tokenizer does not say which token ends a document.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<EOS>")


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable; the message names the file."""


class Tokenizer:
    """Base class: subclasses set `_eod`, `eod_token`, `eod_source` and implement the methods."""

    def __init__(self, kind: str, paths: Sequence[str], **options):
        self.kind = kind
        # Constructor arguments, kept so the object pickles (partition worker processes) by
        # reloading from files instead of shipping a native object.
        self._init_args = (tuple(paths), dict(options))
        self.unique_identifiers = OrderedDict(
            [("class", kind), ("tokenizer_path", [os.path.abspath(p) for p in paths])]
        )
        for key, value in sorted(options.items()):
            self.unique_identifiers[key] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def __reduce__(self):
        paths, options = self._init_args
        return (_rebuild, (type(self), paths, options))

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 1) -> List[List[int]]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return (
            f"{self.kind} ({', '.join(self.unique_identifiers['tokenizer_path'])}): vocab "
            f"{self.vocab_size}, EOD token {self.eod_token!r} = id {self.eod} ({self.eod_source})"
        )


def _rebuild(cls, paths, options):
    return cls(*paths, **options)


class _RustTokenizer(Tokenizer):
    """Shared code for tokenizers run by the Rust `tokenizers` library."""

    _tok = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self):
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self):
        return {i: t for t, i in self.vocab.items()}

    def tokenize_batch(self, texts, num_threads=1):
        # The Rust side splits the batch over its rayon pool (RAYON_NUM_THREADS, set by the caller
        # before first use); no BOS/EOS is added here, the caller appends EOD explicitly.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def tokenize(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _set_eod(self, path: str, eod_token: Optional[str], configured: Optional[str]):
        if eod_token is not None:
            candidates, source = [eod_token], "as given"
        elif configured is not None:
            candidates, source = [configured], "eos_token of tokenizer_config.json"
        else:
            candidates, source = list(_EOD_CANDIDATES), "special token of the tokenizer"
        for name in candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                self._eod, self.eod_token, self.eod_source = token_id, name, source
                return
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        raise TokenizerError(
            f"{path}: no end-of-document token found (looked for {candidates}; the tokenizer's "
            f"special tokens are {specials}); pass eod_token=NAME"
        )


class HuggingFaceTokenizer(_RustTokenizer):
    def __init__(self, tokenizer_model: str, eod_token: Optional[str] = None):
        super().__init__("HuggingFaceTokenizer", [tokenizer_model], eod_token=eod_token)
        from tokenizers import Tokenizer as RustTokenizer

        path, configured = tokenizer_model, None
        if os.path.isdir(path):
            config_path = os.path.join(path, "tokenizer_config.json")
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as f:
                    eos = json.load(f).get("eos_token")
                configured = eos.get("content") if isinstance(eos, dict) else eos
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such tokenizer file (tokenizer_model)")
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as err:
            raise TokenizerError(f"{path}: not a `tokenizers` tokenizer.json file: {err}") from err
        self._set_eod(path, eod_token, configured)


class GPT2BPETokenizer(_RustTokenizer):
    def __init__(self, vocab_file: str, merge_file: str, eod_token: Optional[str] = None):
        super().__init__("GPT2BPETokenizer", [vocab_file, merge_file], eod_token=eod_token)
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for flag, path in (("vocab_file", vocab_file), ("merge_file", merge_file)):
            if not path or not os.path.isfile(path):
                raise TokenizerError(f"{path}: no such file ({flag})")
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:
            raise TokenizerError(f"{vocab_file}, {merge_file}: not GPT-2 BPE files: {err}") from err
        self._tok = RustTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._set_eod(vocab_file, eod_token, None)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, tokenizer_model: str, eod_token: Optional[str] = None):
        super().__init__("SentencePieceTokenizer", [tokenizer_model], eod_token=eod_token)
        import sentencepiece

        if not os.path.isfile(tokenizer_model):
            raise TokenizerError(f"{tokenizer_model}: no such file (tokenizer_model)")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        except Exception as err:
            raise TokenizerError(f"{tokenizer_model}: not a sentencepiece model: {err}") from err
        if eod_token is not None:
            token_id = self._sp.piece_to_id(eod_token)
            if token_id == self._sp.unk_id() and eod_token != self._sp.id_to_piece(token_id):
                raise TokenizerError(f"{tokenizer_model}: eod_token {eod_token!r} not in vocab")
            self._eod, self.eod_source = token_id, "as given"
        elif self._sp.eos_id() >= 0:
            self._eod, self.eod_source = self._sp.eos_id(), "eos_id of the sentencepiece model"
        else:
            raise TokenizerError(
                f"{tokenizer_model}: the sentencepiece model has no eos piece; pass eod_token=NAME"
            )
        self.eod_token = self._sp.id_to_piece(self._eod)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self):
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self):
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    def tokenize_batch(self, texts, num_threads=1):
        return self._sp.encode(list(texts), out_type=int, num_threads=max(1, num_threads))

    def tokenize(self, text):
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids):
        return self._sp.decode([int(i) for i in ids])


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    eod_token: Optional[str] = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron-style arguments (`--tokenizer-type` etc.)."""
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("tokenizer_type HuggingFaceTokenizer needs tokenizer_model")
        return HuggingFaceTokenizer(tokenizer_model, eod_token=eod_token)
    if tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_model:
            raise TokenizerError("tokenizer_type SentencePieceTokenizer needs tokenizer_model")
        return SentencePieceTokenizer(tokenizer_model, eod_token=eod_token)
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise TokenizerError("tokenizer_type GPT2BPETokenizer needs vocab_file and merge_file")
        return GPT2BPETokenizer(vocab_file, merge_file, eod_token=eod_token)
    raise TokenizerError(
        f"tokenizer_type {tokenizer_type!r} is not supported; choose one of {TOKENIZER_TYPES}"
    )
