"""Our parameter paths <-> Hugging Face tensor names, and filling a model from named tensors.

Every importer (safetensors directories, GGUF files) produces tensors under their Hugging Face
names (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`); `build_model` checks each shape
against the config and fills an abstract `Transformer`, whose decoder-layer parameters are
stacked (`layers.self_attn.q_proj.kernel` is `[num_layers, in, out]`; HF layer i is index i).
So the name mapping is written once.
"""

from __future__ import annotations

from typing import Dict, Iterator, NamedTuple, Optional, Protocol, Tuple

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


class ParamName(NamedTuple):
    """One HF tensor and where it lives in our model: the state path `ours`, the index into
    its leading (stacked layer) axis (None for a parameter outside the decoder layers), and
    whether HF stores it transposed (`[out, in]` vs our `[in, out]`)."""

    ours: Tuple[str, ...]
    layer: Optional[int]
    hf: str
    transpose: bool


def hf_param_map(cfg: ModelConfig) -> Iterator[ParamName]:
    """Every parameter of `Transformer` with its Hugging Face tensor name.

    The decoder layers' parameters are stacked (`layers.<path>` has shape `[num_layers, ...]`);
    HF's `model.layers.{i}.<path>` is index i of it.
    """
    yield ParamName(("embed_tokens",), None, "model.embed_tokens.weight", False)
    yield ParamName(("norm", "weight"), None, "model.norm.weight", False)
    if not cfg.tie_word_embeddings:
        yield ParamName(("lm_head", "kernel"), None, "lm_head.weight", True)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield ParamName(("layers", norm, "weight"), i, f"{p}.{norm}.weight", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield ParamName(("layers", "self_attn", proj, "kernel"), i,
                            f"{p}.self_attn.{proj}.weight", True)
        if cfg.attention_bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                yield ParamName(("layers", "self_attn", proj, "bias"), i,
                                f"{p}.self_attn.{proj}.bias", False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield ParamName(("layers", "mlp", proj, "kernel"), i, f"{p}.mlp.{proj}.weight",
                            True)


def abstract_model(cfg: ModelConfig, dtype="float32") -> Transformer:
    """A `Transformer` whose arrays are shape/dtype placeholders (no memory, no init)."""
    dt = parse_dtype(dtype)
    return nnx.eval_shape(lambda: Transformer(cfg, dtype=dt, rngs=nnx.Rngs(0)))


def build_model(cfg: ModelConfig, tensors: TensorSource, dtype="float32",
                where: str = "checkpoint") -> Transformer:
    """A `Transformer` of `cfg` filled from `tensors` (HF names; float32, float16 or bfloat16).

    Raises `CheckpointError` naming `where` and the tensor: a missing tensor, a wrong shape,
    an unsupported dtype. The per-layer tensors of one stacked parameter are gathered into one
    host buffer `[num_layers, ...]` and put on the device once (no second device copy).
    """
    dt = parse_dtype(dtype)
    np_dt = np.dtype(dt)
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    stacks: Dict[Tuple[str, ...], np.ndarray] = {}
    for name in hf_param_map(cfg):
        var = flat[name.ours]
        if name.hf not in tensors:
            raise CheckpointError(f"{where}: checkpoint is missing tensor {name.hf!r}")
        ours_shape = tuple(var.shape[1:] if name.layer is not None else var.shape)
        shape = tensors.shape(name.hf)
        want = ours_shape[::-1] if name.transpose else ours_shape
        if shape != want:
            raise CheckpointError(
                f"{where}: tensor {name.hf!r} has shape {shape}, but the config implies {want}")
        arr = tensors.get(name.hf)
        if arr.dtype not in (np.float32, np.float16) and str(arr.dtype) != "bfloat16":
            raise CheckpointError(f"{where}: tensor {name.hf!r} has unsupported dtype "
                                  f"{arr.dtype}")
        arr = arr.T if name.transpose else arr
        # Other float dtypes go through float32, then round once to the model dtype.
        arr = arr if arr.dtype == np_dt else arr.astype(np.float32).astype(np_dt)
        if name.layer is None:
            var.set_value(jnp.asarray(arr))
        else:
            if name.ours not in stacks:
                stacks[name.ours] = np.empty(var.shape, np_dt)
            stacks[name.ours][name.layer] = arr
    for ours, buf in stacks.items():
        flat[ours].set_value(jnp.asarray(buf))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    _materialize_buffers(model)  # RoPE frequencies are computed, not loaded
    return model


def model_tensors(model: Transformer) -> Iterator[Tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every parameter of a float `model`."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    host: Dict[Tuple[str, ...], np.ndarray] = {}
    for name in hf_param_map(model.config):
        if name.ours not in host:
            host[name.ours] = np.asarray(flat[name.ours].get_value())
        arr = host[name.ours] if name.layer is None else host[name.ours][name.layer]
        yield name.hf, np.ascontiguousarray(arr.T if name.transpose else arr)


def _materialize_buffers(model: Transformer) -> None:
    from models.layers import rope_inv_freq

    cfg = model.config
    model.inv_freq.set_value(
        jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))
