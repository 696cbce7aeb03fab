"""`load_model`: a preset name or an HF checkpoint directory -> a ready `Model`."""

from __future__ import annotations

import dataclasses
import functools
import os
from functools import cached_property
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax import checkpoint
from fineserve_jax.formats import KVFormat, Preset, get_preset
from fineserve_jax.tokenizer import load_tokenizer
from models import presets as model_presets
from models.config import ModelConfig
from models.transformer import Transformer


@dataclasses.dataclass
class Model:
    """A loaded model: the NNX module, its config, precision preset and tokenizer."""

    module: Transformer
    preset: Preset
    tokenizer: Any
    name: str
    source: Optional[str] = None  # checkpoint directory, None for embedded presets

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @cached_property
    def _split(self):
        return nnx.split(self.module)

    @cached_property
    def _logits_fn(self):
        graphdef, _ = self._split

        @functools.partial(jax.jit, static_argnums=(2,))
        def logits(state, token_ids, kv_dtype):
            roundtrip = None if kv_dtype is None else functools.partial(_kv_roundtrip, kv_dtype=kv_dtype)
            return nnx.merge(graphdef, state).full_forward(token_ids, roundtrip)

        return logits

    def logits(self, token_ids, kv_dtype: Optional[str] = None) -> jax.Array:
        """Full causal forward without a cache. token_ids [B, T] int -> float32 [B, T, vocab].

        `kv_dtype` (e.g. `self.preset.kv`) stores K/V as the KV cache of that dtype would
        (quantize + dequantize) before attention: the arithmetic the engine performs.
        """
        ids = jnp.asarray(token_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token_ids must be an integer array [batch, time], got "
                             f"shape {ids.shape} dtype {ids.dtype}")
        if ids.shape[1] == 0:
            raise ValueError("token_ids has no tokens")
        bad = (np.asarray(ids) < 0) | (np.asarray(ids) >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"{np.asarray(ids)[bad][:4].tolist()}")
        return self._logits_fn(self._split[1], ids.astype(jnp.int32), kv_dtype)

    @property
    def param_bytes(self) -> int:
        """Bytes of parameters actually stored (packing, scales and zeros included)."""
        state = nnx.state(self.module, nnx.Param)
        return int(sum(x.nbytes for x in jax.tree.leaves(state)))

    def kv_format(self, tokens_per_block: int = 16) -> KVFormat:
        c = self.config
        return KVFormat(c.num_layers, c.num_kv_heads, c.head_dim, self.preset.kv, tokens_per_block)


def _kv_roundtrip(x, kv_dtype: str):
    """x [..., head_dim] -> the float32 values a KV cache of `kv_dtype` gives back."""
    from fineserve_jax.formats.kv_codec import dequantize_kv_rows, quantize_kv_rows

    data, scales = quantize_kv_rows(x, kv_dtype)
    return dequantize_kv_rows(data, scales, kv_dtype, x.shape[-1]).astype(x.dtype)


def load_model(path_or_preset: str, quant: "str | Preset" = "org", dtype: str = "bfloat16",
               seed: int = 0, calibration: Optional[np.ndarray] = None,
               random_weights: bool = False, num_layers: Optional[int] = None) -> Model:
    """Load a model by embedded preset name (random weights from `seed`) or HF directory.

    `quant` names a precision preset (`fineserve_jax.formats.PRESETS`); quantized presets
    are produced by post-training quantization on load. `dtype` is the dtype of the
    unquantized parameters and activations ("float32" or "bfloat16").
    `random_weights=True` also accepts a real-size shape preset (e.g. "llama-3.1-8b") and
    fills it with random weights: for benchmarks on a machine with the memory for it.
    `num_layers` overrides a preset's depth (shape-reduced benchmarks).
    """
    preset = get_preset(quant)
    if os.path.isdir(path_or_preset):
        module = checkpoint.load_hf_checkpoint(path_or_preset, dtype)
        cfg = module.config
        tok = load_tokenizer(path_or_preset, cfg.bos_token_id, cfg.eos_token_id)
        name, source = cfg.name or os.path.basename(os.path.abspath(path_or_preset)), path_or_preset
    elif path_or_preset in model_presets.TINY or (random_weights and path_or_preset in model_presets.REAL):
        cfg = model_presets.ALL[path_or_preset]
        if num_layers:
            cfg = cfg.replace(num_layers=num_layers)
        module = Transformer(cfg, dtype=checkpoint.parse_dtype(dtype), rngs=nnx.Rngs(seed))
        tok = load_tokenizer(None)
        name, source = path_or_preset, None
    elif path_or_preset in model_presets.REAL:
        raise ValueError(
            f"{path_or_preset!r} is a shape-only preset (no weights are shipped); pass an HF "
            f"checkpoint directory, random_weights=True for a random-weight model of this "
            f"shape, or a tiny preset: {', '.join(model_presets.TINY)}")
    else:
        raise ValueError(
            f"{path_or_preset!r} is neither a directory nor a model preset; presets: "
            f"{', '.join(model_presets.TINY)}")
    if preset.is_quantized:
        from fineserve_jax.quant import quantize_model

        module = quantize_model(module, preset, calibration=calibration)
    return Model(module=module, preset=preset, tokenizer=tok, name=name, source=source)
