"""Checkpoints: Hugging Face safetensors import, orbax save/restore of (quantized) params."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ConfigError, ModelConfig
from models.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory the framework cannot load faithfully."""


def parse_dtype(dtype) -> jnp.dtype:
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unsupported dtype {dtype!r}; valid: {', '.join(names)}")
        return names[dtype]
    return jnp.dtype(dtype)


def read_hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        return ModelConfig.from_json_file(cfg_path)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


class SafetensorsDir:
    """Name -> tensor access over one or several `*.safetensors` files of a directory."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self._where: Dict[str, str] = {}
        self._handles = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{path}: the index names {fname}, which does not exist")
            h = safe_open(fpath, framework="np")
            self._handles[fname] = h
            for k in h.keys():
                self._where[k] = fname

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self._where[name]].get_tensor(name)


def _hf_param_map(cfg: ModelConfig) -> Iterator[Tuple[Tuple, str, bool]]:
    """(our state path, HF tensor name, transpose) for every parameter of `Transformer`."""
    yield ("embed_tokens",), "model.embed_tokens.weight", False
    yield ("norm", "weight"), "model.norm.weight", False
    if not cfg.tie_word_embeddings:
        yield ("lm_head", "kernel"), "lm_head.weight", True
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield ("layers", i, norm, "weight"), f"{p}.{norm}.weight", False
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield ("layers", i, "self_attn", proj, "kernel"), f"{p}.self_attn.{proj}.weight", True
        if cfg.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield ("layers", i, "self_attn", proj, "bias"), f"{p}.self_attn.{proj}.bias", False
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield ("layers", i, "mlp", proj, "kernel"), f"{p}.mlp.{proj}.weight", True


def abstract_model(cfg: ModelConfig, dtype="float32") -> Transformer:
    """A `Transformer` whose arrays are shape/dtype placeholders (no memory, no init)."""
    dt = parse_dtype(dtype)
    return nnx.eval_shape(lambda: Transformer(cfg, dtype=dt, rngs=nnx.Rngs(0)))


def load_hf_checkpoint(path: str, dtype="float32") -> Transformer:
    """Load `config.json` + safetensors (bf16, fp16 or fp32) into a `Transformer`.

    Raises `CheckpointError` naming the problem: a missing tensor, a wrong shape, an
    unsupported architecture, a missing config field.
    """
    cfg = read_hf_config(path)
    dt = parse_dtype(dtype)
    tensors = SafetensorsDir(path)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for ours, theirs, transpose in _hf_param_map(cfg):
        var = flat[ours]
        if theirs not in tensors:
            raise CheckpointError(f"{path}: checkpoint is missing tensor {theirs!r}")
        shape = tensors.shape(theirs)
        want = tuple(var.shape[::-1] if transpose else var.shape)
        if shape != want:
            raise CheckpointError(
                f"{path}: tensor {theirs!r} has shape {shape}, but config.json implies {want}")
        arr = tensors.get(theirs)
        if arr.dtype not in (np.float32, np.float16) and str(arr.dtype) != "bfloat16":
            raise CheckpointError(f"{path}: tensor {theirs!r} has unsupported dtype {arr.dtype}")
        arr = arr.T if transpose else arr
        var.set_value(jnp.asarray(arr.astype(np.float32) if arr.dtype != dt else arr, dtype=dt))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    _materialize_buffers(model)  # RoPE frequencies are computed, not loaded
    return model


def _materialize_buffers(model: Transformer) -> None:
    from models.layers import rope_inv_freq

    cfg = model.config
    model.inv_freq.set_value(
        jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))


def save_hf_checkpoint(model: Transformer, path: str, max_shard_bytes: int = 0) -> None:
    """Write `config.json` + safetensors in HF layout (used by tests and tools).

    With `max_shard_bytes` > 0 the tensors are split over several files plus an index.
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = {}
    for ours, theirs, transpose in _hf_param_map(cfg):
        arr = np.asarray(flat[ours].get_value())
        tensors[theirs] = np.ascontiguousarray(arr.T if transpose else arr)
    if max_shard_bytes <= 0:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname))
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                   "weight_map": weight_map}, f, indent=2)


# --- orbax ---------------------------------------------------------------------------------

def save_params(model: nnx.Module, directory: str) -> None:
    """Save every array of `model` (quantized containers included) with orbax."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, nnx.to_pure_dict(state), force=True)


def restore_params(model: nnx.Module, directory: str) -> nnx.Module:
    """Restore arrays saved by `save_params` into a model of the same structure.

    `model` may be abstract (`nnx.eval_shape`); the restored model is returned.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such orbax checkpoint directory")
    graphdef, state = nnx.split(model)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(directory, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
