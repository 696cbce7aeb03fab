"""Tokenizers: HF `tokenizer.json` through the `tokenizers` library, and a byte tokenizer."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


class ByteTokenizer:
    """Built-in byte-level tokenizer for the embedded tiny models.

    ids: 0 pad, 1 bos, 2 eos, 3 + byte for each UTF-8 byte.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer loaded from `tokenizer.json`."""

    def __init__(self, path: str, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self._tok = Tokenizer.from_file(path)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: Optional[str], bos_token_id=None, eos_token_id=None):
    """The checkpoint's `tokenizer.json` when present, else the byte tokenizer."""
    if path is not None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path, bos_token_id, eos_token_id)
    return ByteTokenizer()
