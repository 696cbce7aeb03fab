"""Tokenizers: BOS/EOS exactly as transformers applies a checkpoint's files, damaged files,
checkpoints without a tokenizer, chat templates."""

import json
import os

import pytest

from fineserve_jax import checkpoint, load_model
from fineserve_jax.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    NoTokenizer,
    TokenizerError,
    load_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo, wörld")
    assert ids[0] == tok.bos_token_id and all(3 <= i < 259 for i in ids[1:])
    assert tok.decode(ids) == "héllo, wörld"
    assert tok.encode("hi", add_special_tokens=False) == [ord("h") + 3, ord("i") + 3]


@pytest.fixture(scope="module")
def base_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return tk.to_str()


def _post(kind):
    from tokenizers import processors
    return {
        "none": None,
        "bos": processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                             special_tokens=[("<s>", 1)]),
        "bos_eos": processors.TemplateProcessing(single="<s> $A </s>",
                                                 pair="<s> $A </s> $B:1 </s>",
                                                 special_tokens=[("<s>", 1), ("</s>", 2)]),
        "bytelevel": processors.ByteLevel(trim_offsets=False),
    }[kind]


def _write_tokenizer(path, base, post, config=None):
    os.makedirs(path, exist_ok=True)
    tk = tokenizers.Tokenizer.from_str(base)
    if _post(post) is not None:
        tk.post_processor = _post(post)
    tk.save(os.path.join(path, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    return str(path)


SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
CONFIGS = {
    "absent": None,
    "names only": SPECIALS,
    "add_bos true": {**SPECIALS, "add_bos_token": True},
    "add_bos false": {**SPECIALS, "add_bos_token": False},
    "add_eos true": {**SPECIALS, "add_eos_token": True},
    "llama class, add_bos true": {**SPECIALS, "tokenizer_class": "LlamaTokenizerFast",
                                  "add_bos_token": True},
}


@pytest.mark.parametrize("post", ["none", "bos", "bos_eos", "bytelevel"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_special_tokens_follow_the_post_processor(tmp_path, base_tokenizer, post, config):
    """BOS/EOS come from tokenizer.json's post-processor; tokenizer_config.json's
    add_bos_token/add_eos_token do not override it (transformers >= 5), and where they
    disagree a warning names the file. Checked against transformers when it is installed."""
    d = _write_tokenizer(tmp_path / "t", base_tokenizer, post, CONFIGS[config])
    with pytest.warns(UserWarning, match="tokenizer_config.json: add_") if _disagrees(post, config) \
            else _no_warning():
        tok = load_tokenizer(d, bos_token_id=1, eos_token_id=2)
    raw = tok.encode("the fox", add_special_tokens=False)
    want = ([1] if post in ("bos", "bos_eos") else []) + raw + ([2] if post == "bos_eos" else [])
    assert tok.encode("the fox") == want
    assert tok.decode(want) == "the fox"
    transformers = _transformers()
    if transformers is not None:
        assert want == transformers.AutoTokenizer.from_pretrained(d)("the fox").input_ids


def _disagrees(post, config):
    c = CONFIGS[config] or {}
    adds_bos, adds_eos = post in ("bos", "bos_eos"), post == "bos_eos"
    return (c.get("add_bos_token", adds_bos) != adds_bos) or (c.get("add_eos_token", adds_eos) != adds_eos)


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _transformers():
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        return transformers
    except ImportError:
        return None


def test_damaged_tokenizer_files_are_named(tmp_path, base_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("")
    with pytest.raises(TokenizerError, match=r"empty/tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(str(empty))
    (empty / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(TokenizerError, match=r"empty/tokenizer\.json"):
        load_tokenizer(str(empty))
    d = _write_tokenizer(tmp_path / "cfg", base_tokenizer, "none")
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"cfg/tokenizer_config\.json: not valid JSON"):
        load_tokenizer(d)
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: must hold a JSON object"):
        load_tokenizer(d)
    (tmp_path / "cfg" / "tokenizer_config.json").write_text('{"bos_token": "<nope>"}')
    with pytest.raises(TokenizerError, match=r"bos_token '<nope>' is not in"):
        load_tokenizer(d)


@pytest.fixture
def hf_dir(tmp_path):
    m = load_model("tiny-llama", dtype="float32", seed=3)
    checkpoint.save_hf_checkpoint(m.module, str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def test_checkpoint_without_tokenizer_refuses_text_not_ids(hf_dir):
    """No tokenizer.json: no silent byte-tokenizer fallback. Token-id prompts are served, text
    prompts fail with a reason saying how to opt in; tokenizer='byte' opts in explicitly."""
    from fineserve_jax import LLM, SamplingParams
    from fineserve_jax.core.buckets import Buckets

    m = load_model(str(hf_dir), dtype="float32")
    assert isinstance(m.tokenizer, NoTokenizer)
    with pytest.raises(TokenizerError, match=r"ckpt: the checkpoint has no tokenizer\.json.*tokenizer='byte'"):
        m.tokenizer.encode("hello")
    llm = LLM(model=m, buckets=Buckets(decode_sizes=(2,), prefill_sizes=(16,), prefill_seqs=2,
                                       table_width=4), profile_reps=0, max_model_len=64)
    outs = llm.generate([[1, 5, 9], "hello"], SamplingParams(max_tokens=3, temperature=0.0))
    assert outs[0].status == "finished" and len(outs[0].token_ids) == 3 and outs[0].text is None
    assert outs[1].status == "failed" and "no tokenizer.json" in outs[1].error
    b = load_model(str(hf_dir), dtype="float32", tokenizer="byte")
    assert isinstance(b.tokenizer, ByteTokenizer) and b.tokenizer.encode("hi")[0] == 1


def test_tokenizer_option(hf_dir, tmp_path, base_tokenizer):
    tdir = _write_tokenizer(tmp_path / "tok", base_tokenizer, "bos")
    m = load_model(str(hf_dir), dtype="float32", tokenizer=tdir)
    assert isinstance(m.tokenizer, HFTokenizer) and m.tokenizer.encode("the")[0] == 1
    m = load_model(str(hf_dir), dtype="float32", tokenizer=os.path.join(tdir, "tokenizer.json"))
    assert isinstance(m.tokenizer, HFTokenizer)
    assert isinstance(load_model("tiny-llama", tokenizer="none").tokenizer, NoTokenizer)
    with pytest.raises(ValueError, match="tokenizer='nope'"):
        load_model(str(hf_dir), tokenizer="nope")
    with pytest.raises(TypeError, match="tokenizer must be"):
        load_model(str(hf_dir), tokenizer=5)


def test_tokenizer_larger_than_model_vocab_is_refused(hf_dir, tmp_path):
    from tokenizers import Tokenizer, models
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
    tk.save(str(hf_dir / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: the tokenizer has 400 tokens but the model's vocab_size is 320"):
        load_model(str(hf_dir))


def test_chat_template_renders_like_transformers(tmp_path, base_tokenizer):
    tpl = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}"
           "{% else %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    d = _write_tokenizer(tmp_path / "t", base_tokenizer, "none", {**SPECIALS, "chat_template": tpl})
    tok = load_tokenizer(d)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " the fox "}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s>[SYS]be brief[USER] the fox\n[ASSISTANT]"
    transformers = _transformers()
    if transformers is not None:
        ht = transformers.AutoTokenizer.from_pretrained(d)
        assert text == ht.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # chat_template.jinja takes priority over tokenizer_config.json (as in transformers)
    (tmp_path / "t" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer(d).apply_chat_template(msgs) == "be brief!"
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(_write_tokenizer(tmp_path / "u", base_tokenizer, "none")).apply_chat_template(msgs)
