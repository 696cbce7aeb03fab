"""GGUF import on hand-made files: weights, q/k permutation, RoPE factors, tokenizers, errors.

The files are written here with the `gguf` package the way llama.cpp's converter writes them
(tensor names, the interleaved q/k row order of the `llama` architecture, block quantization,
tokenizer metadata). References: the original model (float32 files round-trip exactly) and
transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`).
"""


from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package (pip install .[gguf])")

from fineserve_jax import checkpoint, load_model
from fineserve_jax.checkpoint import CheckpointError
from fineserve_jax.checkpoint import gguf as gguf_mod

Q = gguf.GGMLQuantizationType

# Hugging Face name -> GGUF name, written out independently of the importer's table.
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _to_gguf_name(hf):
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}"


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's q/k permutation (Hugging Face halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype=Q.F32, arch=None, meta=None, skip=(), extra_tensors=None,
               rope_freqs=None, tokenizer=None, permute=True):
    """Write `model` (a float `Transformer`) as llama.cpp would: 1-D tensors F32, matrices `qtype`."""
    cfg = model.config
    arch = arch or ("qwen2" if cfg.family == "qwen2" else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"test {cfg.name}")
    fields = {"block_count": cfg.num_layers, "context_length": cfg.max_position_embeddings,
              "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
              "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
              "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}
    fields.update((meta or {}).get("ints", {}))
    for k, v in fields.items():
        if v is not None and k not in skip:
            w.add_uint32(f"{arch}.{k}", v)
    if "rms_eps" not in skip:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
        w.add_eos_token_id(cfg.eos_token_id)
    for k, v in (meta or {}).get("strings", {}).items():
        w.add_string(k, v)
    if tokenizer:
        tokenizer(w)
    for hf, arr in checkpoint.model_tensors(model):
        name = _to_gguf_name(hf)
        if name in skip:
            continue
        if permute and arch == "llama" and (".attn_q." in name or ".attn_k." in name) and arr.ndim == 2:
            arr = _llama_cpp_permute(arr, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _float_model(name, **replace):
    m = load_model(name, dtype="float32", seed=5)
    if replace:
        from flax import nnx

        from models.transformer import Transformer
        cfg = m.config.replace(**replace)
        return Transformer(cfg, rngs=nnx.Rngs(5))
    return m.module


def _logits(module, ids):
    from fineserve_jax.formats import get_preset
    from fineserve_jax.loader import Model
    return np.asarray(Model(module=module, preset=get_preset("org"), tokenizer=None, name="x").logits(ids))


IDS = np.random.default_rng(0).integers(0, 320, size=(2, 23))


# -- exact round trips (float32 tensors) -------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_float32_gguf_roundtrip_is_exact(tmp_path, name, monkeypatch):
    """A float32 GGUF of a model loads back to the same weights and logits, bit for bit; the
    rope_freqs tensor of Llama-3 scaling is recognized; without the q/k un-permutation (the
    mutation) the logits break."""
    src = load_model(name, dtype="float32", seed=5).module
    cfg = src.config
    freqs = None
    if cfg.rope_scaling is not None:  # llama.cpp stores Llama-3 scaling as frequency divisors
        from models.layers import rope_inv_freq
        freqs = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None) / \
            rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    f = write_gguf(tmp_path / "m.gguf", src, rope_freqs=freqs)
    m = load_model(f, dtype="float32")
    assert m.config.num_layers == cfg.num_layers and m.config.tie_word_embeddings == cfg.tie_word_embeddings
    assert m.config.attention_bias == cfg.attention_bias
    ours, theirs = dict(checkpoint.model_tensors(m.module)), dict(checkpoint.model_tensors(src))
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        np.testing.assert_array_equal(v, theirs[k], err_msg=k)
    np.testing.assert_allclose(_logits(m.module, IDS), _logits(src, IDS), rtol=0, atol=1e-5)
    if cfg.family == "llama":
        monkeypatch.setattr(gguf_mod, "unpermute_rows", lambda w, n: w)
        broken = load_model(f, dtype="float32")
        assert np.abs(_logits(broken.module, IDS) - _logits(src, IDS)).max() > 1e-3


def test_rope_freqs_matter(tmp_path):
    """Mutation: the same file without its rope_freqs tensor gives other logits at long range."""
    src = load_model("tiny-llama", dtype="float32", seed=5).module
    cfg = src.config
    from models.layers import rope_inv_freq
    freqs = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None) / \
        rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ids = (np.arange(300) % 300 + 3).reshape(1, -1)
    a = load_model(write_gguf(tmp_path / "a.gguf", src, rope_freqs=freqs), dtype="float32")
    b = load_model(write_gguf(tmp_path / "b.gguf", src), dtype="float32")
    assert b.config.rope_scaling is None and a.config.rope_scaling["rope_type"] == "llama3"
    ref = _logits(src, ids)
    assert np.abs(_logits(a.module, ids) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(_logits(b.module, ids) - ref).max() > 1e-3 * np.abs(ref).max()


def _llama3(factor, orig):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": orig}


def test_llama3_scaling_recovered_from_real_factors():
    from models.layers import rope_inv_freq
    for hd, theta, scaling in [
            (128, 500000.0, _llama3(8.0, 8192)),   # Llama 3.1
            (64, 500000.0, _llama3(32.0, 8192)),   # Llama 3.2 1B
            (16, 500000.0, _llama3(8.0, 256))]:    # tiny-llama: one frequency in the band
        want = rope_inv_freq(hd, theta, scaling)
        factors = rope_inv_freq(hd, theta, None) / want
        got = gguf_mod.llama3_scaling_from_factors(factors, hd, theta)
        np.testing.assert_allclose(rope_inv_freq(hd, theta, got), want, rtol=1e-5)
    assert gguf_mod.llama3_scaling_from_factors(np.ones(8), 16, 1e4) is None
    with pytest.raises(ValueError):  # not monotone: no Llama-3 scaling
        gguf_mod.llama3_scaling_from_factors(np.array([1, 3, 1, 2, 4, 4, 4, 4.0]), 16, 1e4)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(gguf_mod.unpermute_rows(_llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(gguf_mod.unpermute_rows(w, 3), w)


def test_directory_with_one_gguf_loads(tmp_path):
    src = _float_model("tiny-qwen2")
    write_gguf(tmp_path / "model.gguf", src)
    m = load_model(str(tmp_path), dtype="float32")
    assert m.source == str(tmp_path / "model.gguf")
    np.testing.assert_allclose(_logits(m.module, IDS), _logits(src, IDS), atol=1e-5)


# -- against transformers' GGUF loader (quantized tensors) --------------------------------------
@pytest.mark.parametrize("name,qtype", [("tiny-llama", Q.Q8_0), ("tiny-llama", Q.Q4_1),
                                        ("tiny-qwen2", Q.Q4_0), ("tiny-qwen2", Q.F16)])
def test_quantized_gguf_matches_transformers(tmp_path, name, qtype):
    torch = pytest.importorskip("torch", reason="needs the hf extra")
    transformers = pytest.importorskip("transformers", reason="needs the hf extra")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    # transformers' loader ignores rope_freqs, so compare without RoPE scaling.
    src = _float_model(name, rope_scaling=None)
    write_gguf(tmp_path / "m.gguf", src, qtype=qtype)
    ours = load_model(str(tmp_path / "m.gguf"), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    theirs = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for k, v in checkpoint.model_tensors(ours.module):
        np.testing.assert_array_equal(v.view(np.uint32), theirs[k].view(np.uint32), err_msg=k)
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    got = _logits(ours.module, IDS)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # and the quantization really happened: the weights differ from the float source
    if qtype != Q.F16:
        assert np.abs(got - _logits(src, IDS)).max() > 1e-4 * np.abs(ref).max()


# -- errors ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    return _float_model("tiny-llama", rope_scaling=None)


def test_unsupported_architecture(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama, arch="phi3")
    with pytest.raises(CheckpointError, match=r"m\.gguf.*architecture 'phi3'.*general\.architecture"):
        load_model(f)


def test_missing_metadata(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama, skip=("feed_forward_length",))
    with pytest.raises(CheckpointError, match=r"m\.gguf.*no 'llama\.feed_forward_length'"):
        load_model(f)


def test_unsupported_tensor_type(tmp_path, tiny_llama):
    bad = {"blk.0.ffn_up.weight": np.zeros((128, 64), np.int32)}
    f = write_gguf(tmp_path / "m.gguf", tiny_llama, skip=("blk.0.ffn_up.weight",), extra_tensors=bad)
    with pytest.raises(CheckpointError, match=r"m\.gguf.*'blk\.0\.ffn_up\.weight'.*I32"):
        load_model(f)


def test_unknown_tensor_is_refused(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama,
                   extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q_norm\.weight' is not part of"):
        load_model(f)


def test_block_count_smaller_than_tensors(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama, meta={"ints": {"block_count": 1}})
    with pytest.raises(CheckpointError, match=r"llama\.block_count is 1 but the checkpoint holds 2"):
        load_model(f)


def test_mixture_of_experts_refused(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama, meta={"ints": {"expert_count": 8}})
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        load_model(f)


def test_truncated_and_garbage_files(tmp_path, tiny_llama):
    f = write_gguf(tmp_path / "m.gguf", tiny_llama)
    data = Path(f).read_bytes()
    for n in (len(data) - 1000, 200, 10):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=rf"cut{n}\.gguf"):
            load_model(str(p))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF"):
        load_model(str(junk))


def test_two_gguf_files_are_ambiguous(tmp_path, tiny_llama):
    write_gguf(tmp_path / "a.gguf", tiny_llama)
    write_gguf(tmp_path / "b.gguf", tiny_llama)
    with pytest.raises(CheckpointError, match="several GGUF files"):
        load_model(str(tmp_path))


def test_no_tokenizer_metadata_means_token_ids_only(tmp_path, tiny_llama):
    m = load_model(write_gguf(tmp_path / "m.gguf", tiny_llama), dtype="float32")
    from fineserve_jax.tokenizer import NoTokenizer, TokenizerError
    assert isinstance(m.tokenizer, NoTokenizer)
    with pytest.raises(TokenizerError, match=r"m\.gguf: the GGUF file has no tokenizer metadata"):
        m.tokenizer.encode("hello")
    assert m.tokenizer.decode([5, 6]) is None
    b = load_model(str(tmp_path / "m.gguf"), dtype="float32", tokenizer="byte")
    assert b.tokenizer.encode("hi")[0] == 1
