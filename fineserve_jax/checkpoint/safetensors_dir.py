"""Hugging Face checkpoint directories: `config.json` + safetensors (single or sharded)."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np

from fineserve_jax.checkpoint.common import CheckpointError, check_layer_count
from fineserve_jax.checkpoint.param_map import build_model, model_tensors
from models.config import ConfigError, ModelConfig
from models.transformer import Transformer


def read_hf_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        return ModelConfig.from_json_file(cfg_path)
    except ConfigError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(cfg_path) else f"{cfg_path}: {msg}") from None


class SafetensorsDir:
    """Name -> tensor access over one or several `*.safetensors` files of a directory.

    Damaged files (a truncated or unreadable header, an index that is not JSON or names a
    missing file, a tensor stored twice) raise `CheckpointError` naming the file.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            files = _index_files(index)
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self._where: Dict[str, str] = {}
        self._handles = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise CheckpointError(f"{index}: names {fname}, which does not exist")
            try:
                h = safe_open(fpath, framework="np")
                keys = list(h.keys())
            except Exception as e:  # noqa: BLE001 - SafetensorError: truncated / damaged header
                raise CheckpointError(f"{fpath}: not a readable safetensors file ({e}); "
                                      f"truncated or damaged?") from None
            self._handles[fname] = h
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"{path}: tensor {k!r} is stored in both "
                                          f"{self._where[k]} and {fname}")
                self._where[k] = fname

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        fname = self._where[name]
        try:
            return self._handles[fname].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - named with the file and tensor below
            raise CheckpointError(f"{os.path.join(self.path, fname)}: tensor {name!r} could not "
                                  f"be read ({e})") from None


def _index_files(index: str):
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
    bad = [v for v in weight_map.values() if not isinstance(v, str) or os.sep in v or v == ".."]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be file names in the "
                              f"directory, got {bad[:3]}")
    return sorted(set(weight_map.values()))


def load_hf_checkpoint(path: str, dtype="float32") -> Transformer:
    """Load `config.json` + safetensors (bf16, fp16 or fp32) into a `Transformer`.

    Raises `CheckpointError` naming the problem: a missing tensor, a wrong shape, a layer
    count that differs from the checkpoint's, an unsupported architecture, a missing or
    invalid config field, a damaged file.
    """
    cfg = read_hf_config(path)
    tensors = SafetensorsDir(path)
    check_layer_count(tensors.keys(), cfg, os.path.join(path, "config.json"))
    return build_model(cfg, tensors, dtype, where=path)


def save_hf_checkpoint(model: Transformer, path: str, max_shard_bytes: int = 0) -> None:
    """Write `config.json` + safetensors in HF layout (used by tests and tools).

    With `max_shard_bytes` > 0 the tensors are split over several files plus an index.
    """
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    tensors = dict(model_tensors(model))
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
