"""Natural text shipped with the package: AWQ/QoQ calibration data and a held-out text.

  texts/calibration.txt  public-domain English prose, the default calibration text (~2,700
                         words, 3,457 SmolLM2 tokens): Jane Austen, *Pride and Prejudice*
                         (1813), chapter 1; the United States Declaration of Independence
                         (1776, abridged: about half of the list of grievances is left out);
                         Abraham Lincoln, the Gettysburg Address (1863); Herman Melville,
                         *Moby-Dick* (1851), the first paragraphs of chapter 1. All published
                         before 1929 (public domain in the US; the authors died more than 70
                         years ago). The wording was written out from memory for this project
                         and may differ from the printed editions in places.
  texts/heldout.txt      original prose written for this project (Apache-2.0, like the
                         code; ~1,370 words, 1,644 SmolLM2 tokens): a description of an
                         imagined coastal town. It is never used for calibration and, unlike
                         famous public-domain texts, cannot have been memorised by a model,
                         so perplexity on it measures modelling, not recall.

`calibration_ids` turns the `calibration=` argument of `quantize_model` into token ids:
None (the shipped calibration text), a string (any text), or token ids.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

TEXT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "texts")
TEXTS = ("calibration", "heldout")

# The default calibration: up to 16 sequences of 256 tokens cut from the text (all of it when
# shorter; SmolLM2: 13 rows). AWQ's reference calibration uses 128 x 512 tokens of the Pile.
# The scale search samples `awq.DEFAULT_MAX_TOKENS` rows of these; on SmolLM2, 4x more rows
# did not lower KL or held-out perplexity (WORKSPACE_NOTES.md, "Quantized presets on real weights").
DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_SEQS = 16


@functools.lru_cache(maxsize=None)
def read_text(name: str) -> str:
    """The shipped text `name` ("calibration" or "heldout"), as a str."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; shipped texts: {', '.join(TEXTS)}")
    with open(os.path.join(TEXT_DIR, f"{name}.txt"), encoding="utf-8") as f:
        return f.read()


def _prefix(tokenizer) -> list:
    """The ids the tokenizer puts before any text (its BOS, when it adds one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [bos] if bos is not None and probe and probe[0] == bos else []


def tokenize_rows(text: str, tokenizer, seq_len: int = DEFAULT_SEQ_LEN,
                  max_seqs: Optional[int] = DEFAULT_MAX_SEQS) -> np.ndarray:
    """int32 [n_seqs, seq_len]: `text` tokenized once and cut into consecutive rows; each row
    starts with the tokenizer's BOS when it adds one (as a prompt would). The last partial
    row is dropped; at most `max_seqs` rows (None: all)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("calibration text is empty")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = len(ids) // body
    if max_seqs is not None:
        n = min(n, max_seqs)
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one row of "
                         f"{seq_len}; give a longer text or token ids")
    rows = np.asarray(ids[: n * body], np.int64).reshape(n, body)
    if prefix:
        rows = np.concatenate([np.full((n, len(prefix)), prefix, np.int64), rows], axis=1)
    return rows.astype(np.int32)


def calibration_ids(calibration, tokenizer, vocab_size: int,
                    seq_len: int = DEFAULT_SEQ_LEN,
                    max_seqs: Optional[int] = DEFAULT_MAX_SEQS) -> np.ndarray:
    """Token ids int32 [n_seqs, seq_len] for `calibration`:

      None               the shipped calibration text (`read_text("calibration")`),
                         tokenized with `tokenizer`
      str                that text, tokenized with `tokenizer`
      int ids            [n_seqs, seq_len] as given (a 1-D sequence is one row)

    Text needs the model's own tokenizer (an object with `encode`); ids must lie in
    [0, vocab_size).
    """
    if calibration is None or isinstance(calibration, str):
        what = "the default calibration text" if calibration is None else "a calibration text"
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(f"{what} needs the model's tokenizer: pass tokenizer= (e.g. "
                             f"load_model(...).tokenizer), or calibration= token ids "
                             f"[n_seqs, seq_len]")
        text = read_text("calibration") if calibration is None else calibration
        try:  # e.g. a NoTokenizer (a checkpoint without one) raises here
            ids = tokenize_rows(text, tokenizer, seq_len, max_seqs)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure gets the same advice
            raise ValueError(f"{what} could not be tokenized: {e}; pass calibration= token "
                             f"ids [n_seqs, seq_len]") from None
    else:
        ids = np.asarray(calibration)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
            raise ValueError(f"calibration must be None, a str or int token ids "
                             f"[n_seqs, seq_len], got shape {ids.shape} dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size})")
    return ids.astype(np.int32)


def heldout_ids(tokenizer, seq_len: int, max_seqs: Optional[int] = None) -> np.ndarray:
    """The held-out text (`read_text("heldout")`) as int32 [n_seqs, seq_len] rows."""
    return tokenize_rows(read_text("heldout"), tokenizer, seq_len, max_seqs)


def random_token_ids(vocab_size: int, n_seqs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Uniform random token ids int32 [n_seqs, seq_len] from `seed` (synthetic evaluation
    inputs for random-weight models; calibration uses text)."""
    return np.random.default_rng(seed).integers(0, vocab_size, (n_seqs, seq_len), dtype=np.int32)


__all__: Sequence[str] = ["TEXTS", "read_text", "tokenize_rows", "calibration_ids",
                          "heldout_ids", "random_token_ids", "DEFAULT_SEQ_LEN",
                          "DEFAULT_MAX_SEQS"]
