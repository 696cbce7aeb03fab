"""Our parameter paths <-> Hugging Face tensor names, and filling a model from named tensors.

Every importer (safetensors directories, GGUF files) produces tensors under their Hugging Face
names (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`); `build_model` checks each shape
against the config and fills an abstract `Transformer`. So the name mapping is written once.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax.checkpoint.common import CheckpointError, parse_dtype
from models.config import ModelConfig
from models.transformer import Transformer


class TensorSource(Protocol):
    """Tensors by Hugging Face name (a safetensors directory, a GGUF file, ...)."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> Tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


def hf_param_map(cfg: ModelConfig) -> Iterator[Tuple[Tuple, str, bool]]:
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


def build_model(cfg: ModelConfig, tensors: TensorSource, dtype="float32",
                where: str = "checkpoint") -> Transformer:
    """A `Transformer` of `cfg` filled from `tensors` (HF names; float32, float16 or bfloat16).

    Raises `CheckpointError` naming `where` and the tensor: a missing tensor, a wrong shape,
    an unsupported dtype.
    """
    dt = parse_dtype(dtype)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for ours, theirs, transpose in hf_param_map(cfg):
        var = flat[ours]
        if theirs not in tensors:
            raise CheckpointError(f"{where}: checkpoint is missing tensor {theirs!r}")
        shape = tensors.shape(theirs)
        want = tuple(var.shape[::-1] if transpose else var.shape)
        if shape != want:
            raise CheckpointError(
                f"{where}: tensor {theirs!r} has shape {shape}, but the config implies {want}")
        arr = tensors.get(theirs)
        if arr.dtype not in (np.float32, np.float16) and str(arr.dtype) != "bfloat16":
            raise CheckpointError(f"{where}: tensor {theirs!r} has unsupported dtype {arr.dtype}")
        arr = arr.T if transpose else arr
        var.set_value(jnp.asarray(arr.astype(np.float32) if arr.dtype != dt else arr, dtype=dt))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    _materialize_buffers(model)  # RoPE frequencies are computed, not loaded
    return model


def model_tensors(model: Transformer) -> Iterator[Tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every parameter of a float `model`."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for ours, theirs, transpose in hf_param_map(model.config):
        arr = np.asarray(flat[ours].get_value())
        yield theirs, np.ascontiguousarray(arr.T if transpose else arr)


def _materialize_buffers(model: Transformer) -> None:
    from models.layers import rope_inv_freq

    cfg = model.config
    model.inv_freq.set_value(
        jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))
