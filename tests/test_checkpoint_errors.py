"""Every damaged checkpoint gives a `CheckpointError` that names the file and the field/tensor."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fineserve_jax import checkpoint, load_model
from fineserve_jax.checkpoint import CheckpointError
from models.config import ConfigError, ModelConfig
from models.presets import TINY


@pytest.fixture
def hf_dir(tmp_path):
    m = load_model("tiny-llama", dtype="float32", seed=3)
    checkpoint.save_hf_checkpoint(m.module, str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def _edit_config(path, fn):
    p = path / "config.json"
    d = json.loads(p.read_text())
    d = fn(d) or d
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", -1, r"num_hidden_layers must be a positive integer, got -1"),
    ("num_hidden_layers", 0, r"num_hidden_layers must be a positive integer, got 0"),
    ("num_hidden_layers", 1, r"num_hidden_layers is 1 but the checkpoint holds 2 layers"),
    ("num_hidden_layers", 3, r"num_hidden_layers is 3 but the checkpoint holds 2 layers"),
    ("num_hidden_layers", "2", r"num_hidden_layers must be an integer, got '2'"),
    ("num_hidden_layers", True, r"num_hidden_layers must be an integer, got True"),
    ("num_attention_heads", 0, r"num_attention_heads must be a positive integer, got 0"),
    ("num_key_value_heads", 0, r"num_key_value_heads must be a positive integer, got 0"),
    ("num_key_value_heads", 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ("hidden_size", -64, r"hidden_size must be a positive integer"),
    ("intermediate_size", 0, r"intermediate_size must be a positive integer"),
    ("vocab_size", 0, r"vocab_size must be a positive integer"),
    ("head_dim", 15, r"head_dim must be even"),
    ("rms_norm_eps", -1e-5, r"rms_norm_eps must be a positive finite number"),
    ("rope_theta", 0, r"rope_theta must be a positive finite number"),
    ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope_scaling type 'yarn' is not supported"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, r"rope_scaling\.low_freq_factor must be"),
    ("max_position_embeddings", 0, r"max_position_embeddings must be a positive integer"),
    ("tie_word_embeddings", "yes", r"tie_word_embeddings must be true or false"),
    ("bos_token_id", 10_000, r"bos_token_id must be a token id in \[0, vocab_size=320\)"),
])
def test_config_field_errors_name_file_and_field(hf_dir, field, value, match):
    _edit_config(hf_dir, lambda d: d.update({field: value}))
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json: .*" + match):
        load_model(str(hf_dir))


@pytest.mark.parametrize("content,match", [
    (b"[1, 2, 3]", r"the config must be a JSON object, got a JSON list"),
    (b"{broken", r"not valid JSON"),
    (b"\xff\xfe\x00", r"not valid JSON"),
])
def test_config_file_must_hold_an_object(hf_dir, content, match):
    (hf_dir / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"ckpt/config\.json: " + match):
        load_model(str(hf_dir))


def test_fewer_layers_never_dropped_silently_and_mutation(hf_dir):
    """The check is what refuses: with it the smaller config fails; the same checkpoint with
    matching tensors (layer 1 removed) loads."""
    _edit_config(hf_dir, lambda d: d.update(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"refusing to drop layers"):
        load_model(str(hf_dir))
    f = hf_dir / "model.safetensors"
    t = {k: v for k, v in load_file(str(f)).items() if not k.startswith("model.layers.1.")}
    save_file(t, str(f))
    assert load_model(str(hf_dir), dtype="float32").config.num_layers == 1


def test_a_missing_middle_layer_is_named(tmp_path):
    m = load_model("tiny-qwen2", dtype="float32", seed=1)
    checkpoint.save_hf_checkpoint(m.module, str(tmp_path))
    f = tmp_path / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("model.layers.1.")},
              str(f))
    with pytest.raises(CheckpointError, match=r"no tensors for layer\(s\) \[1\] of 3"):
        load_model(str(tmp_path))


def test_config_class_validates_direct_construction():
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer"):
        TINY["tiny-llama"].replace(num_layers=0)
    with pytest.raises(ConfigError, match="family 'gpt2'"):
        TINY["tiny-llama"].replace(family="gpt2")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_hf_dict([])


def test_num_layers_override_only_for_presets(hf_dir):
    with pytest.raises(ValueError, match="num_layers overrides the depth of a preset only"):
        load_model(str(hf_dir), num_layers=1)
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer, got -1"):
        load_model("tiny-llama", num_layers=-1)
    with pytest.raises(ConfigError, match="got 0"):
        load_model("tiny-llama", num_layers=0)


def test_truncated_safetensors_is_named(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    for n in (len(data) - 100, 40, 3, 0):
        f.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors: not a readable safetensors file"):
            load_model(str(hf_dir))


def test_sharded_index_errors(tmp_path):
    m = load_model("tiny-qwen2", dtype="float32", seed=1)
    checkpoint.save_hf_checkpoint(m.module, str(tmp_path), max_shard_bytes=50_000)
    index = tmp_path / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text("this is not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        load_model(str(tmp_path))
    index.write_text("[]")
    with pytest.raises(CheckpointError, match=r"index\.json: no 'weight_map' object"):
        load_model(str(tmp_path))
    d = json.loads(good)
    d["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"index\.json: names model-99999-of-99999\.safetensors, which does not exist"):
        load_model(str(tmp_path))
    d["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"weight_map values must be file names"):
        load_model(str(tmp_path))


def test_tensor_stored_twice_is_refused(hf_dir):
    t = load_file(str(hf_dir / "model.safetensors"))
    save_file({"model.norm.weight": t["model.norm.weight"]}, str(hf_dir / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored in both"):
        load_model(str(hf_dir))


def test_wrong_dtype_tensor_is_named(hf_dir):
    f = hf_dir / "model.safetensors"
    t = load_file(str(f))
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has unsupported dtype int32"):
        load_model(str(hf_dir))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin: neither a checkpoint directory nor a \.gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_damaged_orbax_data_file_is_named(tmp_path):
    a = load_model("tiny-qwen2", dtype="float32", seed=7)
    d = tmp_path / "ckpt"
    checkpoint.save_params(a.module, str(d))
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "ocdbt.process_0") for f in fs]
    biggest = max(files, key=os.path.getsize)
    data = Path(biggest).read_bytes()
    Path(biggest).write_bytes(data[: len(data) // 2])
    abstract = checkpoint.abstract_model(a.config, "float32")
    with pytest.raises(CheckpointError, match=r"ckpt: orbax checkpoint could not be restored"):
        checkpoint.restore_params(abstract, str(d))
