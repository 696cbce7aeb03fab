"""The converted copy of a GGUF file in the model cache: a second load reads it and gives the
same model (weights, logits, config) and the same tokenizer (ids, special tokens, chat
template)."""

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install .[gguf])")

from fineserve_jax import load_model  # noqa: E402
from fineserve_jax.checkpoint import gguf_cache  # noqa: E402
from test_gguf import write_gguf  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tokenizer_fields(vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    d = json.loads(tk.to_str())
    tokens = [t for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
        w.add_chat_template(TEMPLATE)

    return add


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESERVE_JAX_GGUF_CACHE", "1")
    monkeypatch.setenv("FINESERVE_JAX_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def test_second_load_reads_the_converted_copy(tmp_path, cache_dir):
    src = load_model("tiny-llama", dtype="float32", seed=3)
    path = write_gguf(tmp_path / "m.gguf", src.module, qtype=gguf.GGMLQuantizationType.Q8_0,
                      tokenizer=_tokenizer_fields(src.config.vocab_size))
    assert gguf_cache.lookup(path) is None
    first = load_model(path, dtype="float32")
    converted = gguf_cache.lookup(path)
    assert converted is not None and str(cache_dir) in converted
    second = load_model(path, dtype="float32")
    ids = np.array([[1, 7, 99, 200, 31]])
    assert np.array_equal(np.asarray(first.logits(ids)), np.asarray(second.logits(ids)))
    assert first.config == second.config
    text = "the lazy fox <|im_start|>"
    assert first.tokenizer.encode(text) == second.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert first.tokenizer.apply_chat_template(msgs) == second.tokenizer.apply_chat_template(msgs)
    assert (first.tokenizer.bos_token_id, first.tokenizer.eos_token_id) == \
        (second.tokenizer.bos_token_id, second.tokenizer.eos_token_id)
    # Mutation: a changed file (new modification time) is converted again, not read stale.
    os.utime(path, ns=(0, 10**18))
    assert gguf_cache.lookup(path) is None


def test_cache_off_and_size_limit(tmp_path, cache_dir, monkeypatch):
    src = load_model("tiny-qwen2", dtype="float32", seed=1)
    path = write_gguf(tmp_path / "q.gguf", src.module)
    monkeypatch.setenv(gguf_cache.MAX_ENV, "1000")  # far below the conversion's size
    load_model(path, dtype="float32")
    assert gguf_cache.lookup(path) is None
    monkeypatch.delenv(gguf_cache.MAX_ENV)
    monkeypatch.setenv("FINESERVE_JAX_GGUF_CACHE", "0")
    load_model(path, dtype="float32")
    monkeypatch.setenv("FINESERVE_JAX_GGUF_CACHE", "1")
    assert gguf_cache.lookup(path) is None
