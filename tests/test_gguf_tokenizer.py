"""Tokenizers rebuilt from GGUF metadata, on hand-made vocabularies.

Reference: transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=)`)
for the pre-tokenizers it implements (qwen2, llama-bpe, SentencePiece), and llama.cpp's rules
where transformers does not follow them (the `smollm` digit split, add_bos defaults).
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install .[gguf])")

from fineserve_jax.checkpoint import CheckpointError, open_gguf

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Don't you'll we're 123 4567 89",
          "  spaces   and\ttabs\nnew lines\r\n", "café naïve ünïcödé — “quotes”", "x = f(y) + 1;"] * 40
TEXTS = ["The lazy dog", "I'll pay 12345 dollars", "  two  spaces\n\nand lines", "café 😀 Ω",
         "<|im_start|>user\nhi<|im_end|>\n", "DON'T shout", "a<think>b</think>", ""]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def byte_level_vocab():
    """(tokens, merges) of a byte-level BPE trained here, GGUF-style (id order)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=CONTROL + ["<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    d = json.loads(tk.to_str())
    vocab = d["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return tokens, merges


def _write(path, tokens, *, model="gpt2", pre=None, merges=None, scores=None, types=None,
           bos=None, eos=None, add_bos=None, add_eos=None, template=None, space_prefix=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types if types is not None else
                      [3 if t in CONTROL else 4 if t in ("<think>", "</think>") else 1 for t in tokens])
    for value, add in ((merges, w.add_token_merges), (scores, w.add_token_scores),
                       (bos, w.add_bos_token_id), (eos, w.add_eos_token_id),
                       (add_bos, w.add_add_bos_token), (add_eos, w.add_add_eos_token),
                       (space_prefix, w.add_add_space_prefix), (template, w.add_chat_template)):
        if value is not None:  # absent keys matter: llama.cpp's defaults apply
            add(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _ours(path):
    from fineserve_jax.loader import _gguf_tokenizer
    return _gguf_tokenizer(open_gguf(path))


def _transformers_tokenizer(path):
    pytest.importorskip("torch", reason="needs the hf extra")
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    import os
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_byte_level_matches_transformers(tmp_path, byte_level_vocab, pre):
    tokens, merges = byte_level_vocab
    f = _write(tmp_path / "t.gguf", tokens, pre=pre, merges=merges, bos=0, eos=2, add_bos=False)
    ours, theirs = _ours(f), _transformers_tokenizer(f)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    # a CONTROL token is one id, and dropped when decoding; user-defined ones are kept
    assert ours.encode("<|im_start|>") == [tokens.index("<|im_start|>")]
    assert ours.decode(ours.encode("a<think>b")) == "a<think>b"


def test_smollm_pre_tokenizer_splits_digits(tmp_path, byte_level_vocab):
    """llama.cpp's `smollm` pre-tokenizer isolates every digit (transformers' GGUF tokenizer
    does not); `gpt-2`'s keeps digit runs together, so the trained merges apply."""
    tokens, merges = byte_level_vocab
    smol = _ours(_write(tmp_path / "s.gguf", tokens, pre="smollm", merges=merges))
    gpt2 = _ours(_write(tmp_path / "g.gguf", tokens, pre="gpt-2", merges=merges))
    digits = [tokens.index(c) for c in "4567"]
    assert smol.encode("4567") == digits
    assert gpt2.encode("4567") != digits          # the mutation: without the digit split
    assert smol.decode(smol.encode("pay 4567 now")) == "pay 4567 now"


@pytest.mark.parametrize("pre,add_bos,add_eos,want_bos,want_eos", [
    ("qwen2", None, None, False, False),       # byte-level BPE: no BOS unless the file says so
    ("llama-bpe", None, None, True, False),    # llama.cpp's Llama-3 default adds BOS
    ("qwen2", True, None, True, False),
    ("llama-bpe", False, True, False, True),
])
def test_bos_eos_rules(tmp_path, byte_level_vocab, pre, add_bos, add_eos, want_bos, want_eos):
    tokens, merges = byte_level_vocab
    f = _write(tmp_path / "t.gguf", tokens, pre=pre, merges=merges, bos=1, eos=2,
               add_bos=add_bos, add_eos=add_eos)
    ids = _ours(f).encode("The dog")
    assert (ids[0] == 1) == want_bos and (ids[-1] == 2) == want_eos
    assert _ours(f).encode("The dog", add_special_tokens=False)[0] != 1
    if add_bos is not None:  # transformers applies explicit flags the same way
        assert ids == _transformers_tokenizer(f)("The dog").input_ids


def test_chat_template_and_special_tokens(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    f = _write(tmp_path / "t.gguf", tokens, pre="qwen2", merges=merges, bos=1, eos=2,
               add_bos=False, template=tpl)
    tok = _ours(f)
    assert tok.eos_token_id == 2 and tok.special_tokens["eos_token"] == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_unsupported_tokenizers_are_named(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    with pytest.raises(CheckpointError, match=r"t\.gguf: pre-tokenizer 'mystery' \(tokenizer\.ggml\.pre\)"):
        _ours(_write(tmp_path / "t.gguf", tokens, pre="mystery", merges=merges))
    with pytest.raises(CheckpointError, match=r"u\.gguf: tokenizer model 'bert'"):
        _ours(_write(tmp_path / "u.gguf", tokens, model="bert"))
    with pytest.raises(CheckpointError, match=r"v\.gguf: GGUF metadata has no 'tokenizer\.ggml\.merges'"):
        _ours(_write(tmp_path / "v.gguf", tokens, pre="qwen2"))
    with pytest.raises(CheckpointError, match=r"bos_token_id' = 9999 is outside"):
        _ours(_write(tmp_path / "w.gguf", tokens, pre="qwen2", merges=merges, bos=9999))


@pytest.fixture(scope="module")
def sentencepiece_vocab():
    """A SentencePiece-style BPE vocabulary: <unk> <s> </s>, 256 byte tokens, pieces with
    scores (higher = merged earlier), as llama.cpp stores Llama-2/Mistral tokenizers."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200))
    vocab = json.loads(tk.to_str())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def test_sentencepiece_matches_transformers(tmp_path, sentencepiece_vocab):
    tokens, types, scores = sentencepiece_vocab
    f = _write(tmp_path / "sp.gguf", tokens, model="llama", scores=scores, types=types, bos=1, eos=2)
    ours, theirs = _ours(f), _transformers_tokenizer(f)
    for text in ["The lazy dog", "quick  brown\nfox", "Ω unseen → bytes", "don't 12"]:
        ids = ours.encode(text)
        assert ids[0] == 1  # SentencePiece GGUFs without add_bos_token add BOS (llama.cpp)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    # byte fallback really used for characters outside the vocabulary
    assert tokens.index("<0xCE>") in ours.encode("Ω")


def test_sentencepiece_without_space_prefix(tmp_path, sentencepiece_vocab):
    """`tokenizer.ggml.add_space_prefix = false`: llama.cpp prepends no "▁" (transformers'
    GGUF tokenizer ignores the flag, so llama.cpp's rule is the reference here)."""
    tokens, types, scores = sentencepiece_vocab
    with_prefix = _ours(_write(tmp_path / "a.gguf", tokens, model="llama", scores=scores,
                               types=types, bos=1, eos=2))
    without = _ours(_write(tmp_path / "b.gguf", tokens, model="llama", scores=scores,
                           types=types, bos=1, eos=2, space_prefix=False))
    a, b = with_prefix.encode("The lazy dog"), without.encode("The lazy dog")
    assert tokens[a[1]].startswith("\u2581") and not tokens[b[1]].startswith("\u2581")
    assert a[2:] == b[2:]
    assert without.decode(b) == "The lazy dog" == with_prefix.decode(a)


def test_merges_from_scores_rank_by_score():
    from fineserve_jax.checkpoint.gguf_tokenizer import _merges_from_scores
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges_from_scores(tokens, [1] * 6, [0, 0, 0, -2.0, -1.0, -0.5], vocab)
    assert merges[0] in (("a", "bc"), ("ab", "c")) and merges.index(("b", "c")) < merges.index(("a", "b"))
    assert np.all([len(a + b) > 1 for a, b in merges])
