"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

A GGUF stores its tokenizer as metadata under llama.cpp's keys: `tokenizer.ggml.model` (`gpt2`:
byte-level BPE; `llama`: SentencePiece-style BPE with byte fallback), the token list, token
types, merges or scores, the pre-tokenizer name (`tokenizer.ggml.pre`), special token ids, the
`add_bos_token`/`add_eos_token` rules and the chat template. This module turns those into the
tokenizer llama.cpp runs:

- pre-tokenizer: llama.cpp's split expressions for the named pre-tokenizer (e.g. `smollm`
  splits every digit apart before the GPT-2 expression, `llama-bpe` is Llama 3's, `qwen2` is
  Qwen2's); an unknown name is an error, never a silent GPT-2 default;
- tokens of type CONTROL become special tokens (matched whole in text, skipped when decoding),
  USER_DEFINED ones added tokens;
- BOS/EOS: the post-processor adds them exactly when the file says so (`add_bos_token`,
  `add_eos_token`); where it is silent, llama.cpp's default for the vocabulary type applies
  (SentencePiece adds BOS; byte-level BPE does not, except the Llama-3 and Tekken
  pre-tokenizers).

Note: transformers' own GGUF tokenizer ignores the `smollm` pre-tokenizer name (it keeps GPT-2's
expression, so "123" stays one piece); llama.cpp and the original SmolLM2 `tokenizer.json` split
digits, and so does this module.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from fineserve_jax.checkpoint.common import CheckpointError

# llama.cpp token types (llama_token_type in llama.h)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    splits: Tuple[str, ...]   # applied in order, each piece isolated (llama.cpp's regex_exprs)
    add_bos: bool = False     # llama.cpp's default when the file has no add_bos_token
    ignore_merges: bool = False


# `tokenizer.ggml.pre` names (as llama.cpp spells them) -> how llama.cpp splits text.
_PRE_TOKENIZERS: Dict[str, _PreTokenizer] = {
    **{n: _PreTokenizer((_GPT2_SPLIT,)) for n in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de",
                                                 "mpt", "olmo", "jais")},
    **{n: _PreTokenizer((r"\p{N}", _GPT2_SPLIT)) for n in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{n: _PreTokenizer((_LLAMA3_SPLIT,), add_bos=True, ignore_merges=True) for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3")},
    **{n: _PreTokenizer((_QWEN2_SPLIT,)) for n in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), add_bos=True, ignore_merges=True),
}


@dataclasses.dataclass
class GGUFTokenizerParts:
    """A GGUF's tokenizer: the `tokenizers` object (post-processor adds BOS/EOS as the file
    says) and what a front end needs besides."""

    tokenizer: "object"               # tokenizers.Tokenizer
    bos_token_id: Optional[int]
    eos_token_id: Optional[int]
    add_bos_token: bool
    add_eos_token: bool
    chat_template: Optional[str]
    special_tokens: Dict[str, Optional[str]]   # bos_token, eos_token, unk_token, pad_token


def has_gguf_tokenizer(gf) -> bool:
    return gf.has("tokenizer.ggml.model")


def gguf_tokenizer(gf) -> GGUFTokenizerParts:
    """The tokenizer of `gf` (a `checkpoint.gguf.GGUFFile`); `CheckpointError` names the key."""
    from tokenizers import AddedToken

    path = gf.path
    model = gf.meta("tokenizer.ggml.model", str)
    tokens: List[str] = gf.meta("tokenizer.ggml.tokens", list)
    if not tokens:
        raise CheckpointError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' is empty")
    types = gf.meta("tokenizer.ggml.token_type", list, None) or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: 'tokenizer.ggml.token_type' has {len(types)} entries for "
                              f"{len(tokens)} tokens")

    def token_id(key: str) -> Optional[int]:
        i = gf.meta(f"tokenizer.ggml.{key}", int, None)
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{path}: 'tokenizer.ggml.{key}' = {i} is outside the "
                                  f"{len(tokens)} tokens")
        return i

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    unk, pad = token_id("unknown_token_id"), token_id("padding_token_id")
    if model == "gpt2":
        pre_name = gf.meta("tokenizer.ggml.pre", str, "gpt-2")
        if pre_name not in _PRE_TOKENIZERS:
            raise CheckpointError(
                f"{path}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
                f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        pre = _PRE_TOKENIZERS[pre_name]
        tok = _byte_level_bpe(gf, tokens, pre)
        default_bos = pre.add_bos
    elif model == "llama":
        tok = _sentencepiece_bpe(gf, tokens, types, unk)
        default_bos = True
    else:
        raise CheckpointError(f"{path}: tokenizer model {model!r} (tokenizer.ggml.model) is not "
                              f"supported; supported: 'gpt2' (byte-level BPE), 'llama' "
                              f"(SentencePiece BPE)")
    # Control tokens are special (whole in text, dropped by decode(skip_special_tokens)),
    # user-defined ones are matched whole but decoded as text.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    for i in (bos, eos, unk, pad):
        if i is not None and types[i] != _CONTROL:
            special.append(AddedToken(tokens[i], special=True, normalized=False))
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    _check_ids_kept(path, tok, tokens)
    add_bos = gf.meta("tokenizer.ggml.add_bos_token", bool, default_bos)
    add_eos = gf.meta("tokenizer.ggml.add_eos_token", bool, False)
    if add_bos and bos is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.add_bos_token is true but the file has "
                              f"no tokenizer.ggml.bos_token_id")
    if add_eos and eos is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.add_eos_token is true but the file has "
                              f"no tokenizer.ggml.eos_token_id")
    tok.post_processor = _template(tokens, bos if add_bos else None, eos if add_eos else None)
    def name(i: Optional[int]) -> Optional[str]:
        return tokens[i] if i is not None else None

    return GGUFTokenizerParts(
        tokenizer=tok, bos_token_id=bos, eos_token_id=eos, add_bos_token=add_bos,
        add_eos_token=add_eos, chat_template=gf.meta("tokenizer.chat_template", str, None),
        special_tokens={"bos_token": name(bos), "eos_token": name(eos), "unk_token": name(unk),
                        "pad_token": name(pad)})


def _template(tokens, bos: Optional[int], eos: Optional[int]):
    from tokenizers import processors

    pre = [tokens[bos]] if bos is not None else []
    post = [tokens[eos]] if eos is not None else []
    single = " ".join(pre + ["$A"] + post)
    pair = " ".join(pre + ["$A"] + post + pre + ["$B:1"] + post)
    specials = [(tokens[i], i) for i in {x for x in (bos, eos) if x is not None}]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _byte_level_bpe(gf, tokens: List[str], pre: _PreTokenizer):
    """GPT-2-style BPE over bytes: the file's tokens are already spelled in the byte alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges_raw: List[str] = gf.meta("tokenizer.ggml.merges", list)
    merges = []
    for i, m in enumerate(merges_raw):
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{gf.path}: tokenizer.ggml.merges[{i}] = {m!r} is not two "
                                  f"tokens separated by one space")
        merges.append((parts[0], parts[1]))
    vocab = _first_ids(tokens)
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges,
                         byte_fallback=False, fuse_unk=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise CheckpointError(f"{gf.path}: tokenizer.ggml.merges do not fit the vocabulary "
                              f"({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(gf, tokens: List[str], types: List[int], unk: Optional[int]):
    """SentencePiece BPE (Llama 2, Mistral): `▁` for spaces, merges ranked by token score,
    `<0xNN>` byte tokens for what the vocabulary cannot spell."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = gf.meta("tokenizer.ggml.scores", list, None)
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError(f"{gf.path}: a SentencePiece GGUF tokenizer needs "
                              f"'tokenizer.ggml.scores', one per token")
    vocab = _first_ids(tokens)
    if gf.has("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in gf.meta("tokenizer.ggml.merges", list)]
    else:
        merges = _merges_from_scores(tokens, types, scores, vocab)
    add_prefix = gf.meta("tokenizer.ggml.add_space_prefix", bool, True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                               unk_token=tokens[unk] if unk is not None else None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(tokens, types, scores, vocab) -> List[Tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a normal token into two
    vocabulary tokens, the higher the merged token's score the earlier (longer left part first
    among equal scores, as SentencePiece's greedy pair search tends to build them)."""
    ranked = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (_NORMAL, _USER_DEFINED) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), -len(left), -len(right), vocab[left],
                               vocab[right], left, right))
    ranked.sort()
    return [(r[5], r[6]) for r in ranked]


def _first_ids(tokens: List[str]) -> Dict[str, int]:
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _check_ids_kept(path: str, tok, tokens: List[str]) -> None:
    # Added tokens whose text is missing from the model vocabulary would get new ids past the
    # end; every id must stay the file's.
    if tok.get_vocab_size(with_added_tokens=True) > len(tokens):
        raise CheckpointError(f"{path}: the GGUF vocabulary could not be rebuilt with the file's "
                              f"token ids (duplicate token strings?)")
