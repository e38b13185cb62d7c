"""Tokenizers for serving and evaluation: the checkpoint's tokenizer.json, or raw UTF-8 bytes.

Rule used by `load_tokenizer(model_dir)` (first match wins):
  1. `model_dir/tokenizer.json` exists  -> `HFTokenizer` (the `tokenizers` library, with the
     checkpoint's own normalizer, pre-tokenizer and post-processor, so BOS is added exactly as
     transformers' fast tokenizer would add it).
  2. `model_dir/config.json` has 256 <= vocab_size <= 512 -> `ByteTokenizer`: ids 0..255 are the
     UTF-8 bytes, ids 256..vocab_size-1 are specials (never produced by `encode`, dropped by `decode`).
     The upper bound keeps a sentencepiece model whose tokenizer.json is missing (vocab 32000) from
     being silently read as bytes.
  3. otherwise ValueError naming the directory (e.g. only tokenizer.model: save it as tokenizer.json
     with transformers' `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`).
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

BYTE_VOCAB = 256
MAX_BYTE_LEVEL_VOCAB = 512


class Tokenizer(Protocol):
    """What serve/eval need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: token id == UTF-8 byte value; ids >= 256 are special tokens.

    `decode` drops special ids and replaces invalid UTF-8 (a sequence cut mid-character) with U+FFFD.
    """

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"ByteTokenizer: vocab_size {vocab_size} < {BYTE_VOCAB} cannot hold every byte")
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from tokenizer.json.

    encode: adds the special tokens the post-processor defines (e.g. Mistral's BOS), like
    transformers' fast tokenizers do by default. decode: skips special tokens.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _RustTokenizer  # imported lazily: only serving needs it

        if not os.path.isfile(path):
            raise ValueError(f"HFTokenizer: {path} does not exist")
        self.path = path
        self._tok = _RustTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_dir: str, vocab_size: int | None = None) -> Tokenizer:
    """Tokenizer for a checkpoint directory (see the module docstring for the rule).

    vocab_size: the model's, when the caller has loaded it (a milo-jax checkpoint keeps its config
    in its own metadata, not in config.json); otherwise read from the directory's config.json.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"load_tokenizer: {model_dir} is not a directory")
    tok_json = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        return HFTokenizer(tok_json)
    cfg_path = os.path.join(model_dir, "config.json")
    if vocab_size is None and os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            vocab_size = json.load(f).get("vocab_size")
    if vocab_size is not None and BYTE_VOCAB <= int(vocab_size) <= MAX_BYTE_LEVEL_VOCAB:
        return ByteTokenizer(int(vocab_size))
    raise ValueError(
        f"load_tokenizer: {model_dir} has no tokenizer.json and config.json vocab_size={vocab_size} "
        f"is not byte-level ({BYTE_VOCAB}..{MAX_BYTE_LEVEL_VOCAB}); write tokenizer.json with "
        "transformers' AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
    )
