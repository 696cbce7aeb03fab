"""HF safetensors import errors and orbax save/restore."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from fineserve_jax import checkpoint, load_model
from fineserve_jax.checkpoint import CheckpointError


@pytest.fixture
def hf_dir(tmp_path):
    m = load_model("tiny-llama", dtype="float32", seed=3)
    checkpoint.save_hf_checkpoint(m.module, str(tmp_path))
    return tmp_path


def test_roundtrip_through_hf_layout(hf_dir):
    a = load_model("tiny-llama", dtype="float32", seed=3)
    b = load_model(str(hf_dir), dtype="float32")
    ids = np.array([[1, 5, 9, 200]])
    np.testing.assert_array_equal(np.asarray(a.logits(ids)), np.asarray(b.logits(ids)))


def test_own_sharded_writer_loads(tmp_path):
    a = load_model("tiny-qwen2", dtype="float32", seed=1)
    checkpoint.save_hf_checkpoint(a.module, str(tmp_path), max_shard_bytes=50_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    b = load_model(str(tmp_path), dtype="float32")
    ids = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(a.logits(ids)), np.asarray(b.logits(ids)))


def test_bf16_checkpoint_loads(tmp_path):
    a = load_model("tiny-mistral", dtype="bfloat16", seed=2)
    checkpoint.save_hf_checkpoint(a.module, str(tmp_path))
    st = load_file(str(tmp_path / "model.safetensors"))
    assert str(st["model.norm.weight"].dtype) == "bfloat16"
    b = load_model(str(tmp_path), dtype="float32")
    assert np.isfinite(np.asarray(b.logits(np.array([[1, 2, 3]])))).all()


def _rewrite(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_tensor(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(str(hf_dir))


def test_wrong_shape(hf_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
    _rewrite(hf_dir, shrink)
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \(8, 64\).*\(32, 64\)"):
        load_model(str(hf_dir))


def _edit_config(path, fn):
    p = path / "config.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_unsupported_architecture(hf_dir):
    _edit_config(hf_dir, lambda d: d.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(CheckpointError, match="unsupported architectures.*GPT2LMHeadModel"):
        load_model(str(hf_dir))


def test_missing_config_field(hf_dir):
    _edit_config(hf_dir, lambda d: d.pop("intermediate_size"))
    with pytest.raises(CheckpointError, match="missing required field.*intermediate_size"):
        load_model(str(hf_dir))


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_sliding_window_past_window_is_an_error():
    m = load_model("tiny-mistral", dtype="float32")
    cfg = m.config.replace(sliding_window=8)
    from models.transformer import Transformer
    mod = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sliding window 8"):
        mod.full_forward(np.zeros((1, 9), np.int32))


def test_orbax_roundtrip_bit_identical(tmp_path):
    a = load_model("tiny-qwen2", dtype="bfloat16", seed=7)
    checkpoint.save_params(a.module, str(tmp_path / "ckpt"))
    abstract = checkpoint.abstract_model(a.config, "bfloat16")
    restored = checkpoint.restore_params(abstract, str(tmp_path / "ckpt"))
    la = jax.tree.leaves(nnx.state(a.module, nnx.Param))
    lb = jax.tree.leaves(nnx.state(restored, nnx.Param))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x).view(np.uint16), np.asarray(y).view(np.uint16))
