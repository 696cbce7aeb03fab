"""`load_model`: a preset name or an HF checkpoint directory -> a ready `Model`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from functools import cached_property
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fineserve_jax import checkpoint
from fineserve_jax.formats import KVFormat, Preset, get_preset
from fineserve_jax.formats.kv_rotation import rotates_kv
from fineserve_jax.tokenizer import (ByteTokenizer, HFTokenizer, NoTokenizer, TokenizerError,
                                     load_tokenizer)
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
    # Seconds spent reading/building the float weights and quantizing them (start-up report).
    load_s: float = 0.0
    quantize_s: float = 0.0

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
            if kv_dtype is None:
                return nnx.merge(graphdef, state).full_forward(token_ids)
            return nnx.merge(graphdef, state).full_forward(
                token_ids, functools.partial(_kv_roundtrip, kv_dtype=kv_dtype), rotates_kv(kv_dtype))

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
               random_weights: bool = False, num_layers: Optional[int] = None,
               tokenizer: Any = "auto") -> Model:
    """Load a model by embedded preset name (random weights from `seed`), Hugging Face
    directory (`config.json` + safetensors) or GGUF file (a `.gguf` path, or a directory
    holding exactly one `.gguf` and no `config.json`; Llama-family architectures).

    `quant` names a precision preset (`fineserve_jax.formats.PRESETS`); quantized presets
    are produced by post-training quantization on load. `dtype` is the dtype of the
    unquantized parameters and activations ("float32" or "bfloat16").
    `random_weights=True` also accepts a real-size shape preset (e.g. "llama-3.1-8b") and
    fills it with random weights: for benchmarks on a machine with the memory for it.
    `num_layers` overrides a preset's depth (shape-reduced benchmarks).
    `tokenizer`: "auto" (the checkpoint's own: `tokenizer.json`, the GGUF's metadata, the
    byte tokenizer for embedded presets; a checkpoint without one gets a `NoTokenizer`, so
    token-id prompts work and text prompts fail with a clear error), "byte" (the byte
    tokenizer, explicitly), "none", a path to a `tokenizer.json` (or a directory holding one),
    or a tokenizer object with `encode`/`decode`.
    """
    t_start = time.perf_counter()
    preset = get_preset(quant)
    if isinstance(path_or_preset, os.PathLike):
        path_or_preset = os.fspath(path_or_preset)
    if not isinstance(path_or_preset, str):
        raise TypeError(f"path_or_preset must be a str (a preset name, an HF directory or a "
                        f".gguf file), got {type(path_or_preset).__name__}")
    if num_layers is not None and path_or_preset not in model_presets.ALL:
        raise ValueError("num_layers overrides the depth of a preset only; a checkpoint's "
                         "depth is the number of layers it holds")
    gguf_file = None if os.path.isfile(os.path.join(path_or_preset, "config.json")) else \
        checkpoint.find_gguf_file(path_or_preset)
    if gguf_file is not None:
        module, auto = _load_gguf(gguf_file, dtype)
        cfg = module.config
        name, source = cfg.name, gguf_file
    elif os.path.isdir(path_or_preset):
        module = checkpoint.load_hf_checkpoint(path_or_preset, dtype)
        cfg = module.config
        auto = functools.partial(load_tokenizer, path_or_preset, cfg.bos_token_id,
                                 cfg.eos_token_id)
        name, source = cfg.name or os.path.basename(os.path.abspath(path_or_preset)), path_or_preset
    elif path_or_preset in model_presets.TINY or (random_weights and path_or_preset in model_presets.REAL):
        cfg = model_presets.ALL[path_or_preset]
        if num_layers is not None:
            cfg = cfg.replace(num_layers=num_layers)
        module = Transformer(cfg, dtype=checkpoint.parse_dtype(dtype), rngs=nnx.Rngs(seed))
        auto = ByteTokenizer  # the embedded presets are defined over the byte vocabulary
        name, source = path_or_preset, None
    elif path_or_preset in model_presets.REAL:
        raise ValueError(
            f"{path_or_preset!r} is a shape-only preset (no weights are shipped); pass an HF "
            f"checkpoint directory, random_weights=True for a random-weight model of this "
            f"shape, or a tiny preset: {', '.join(model_presets.TINY)}")
    elif os.path.exists(path_or_preset):
        raise ValueError(f"{path_or_preset}: neither a checkpoint directory nor a .gguf file")
    else:
        raise ValueError(
            f"{path_or_preset!r} is neither a directory, a .gguf file nor a model preset; "
            f"presets: {', '.join(model_presets.TINY)}")
    tok = _resolve_tokenizer(tokenizer, auto, cfg, source or path_or_preset)
    t_loaded = time.perf_counter()
    if preset.is_quantized:
        from fineserve_jax.quant import quantize_model

        module = quantize_model(module, preset, calibration=calibration, tokenizer=tok)
    return Model(module=module, preset=preset, tokenizer=tok, name=name, source=source,
                 load_s=t_loaded - t_start, quantize_s=time.perf_counter() - t_loaded)


def _load_gguf(gguf_file: str, dtype):
    """(module, tokenizer factory) of a GGUF file, through its converted copy in the model
    cache when there is one (`checkpoint.gguf_cache`), converting it on the first load."""
    from fineserve_jax.checkpoint import gguf_cache
    from fineserve_jax.checkpoint.gguf import checked_tensors, dequantized_bytes
    from fineserve_jax.checkpoint.param_map import build_model

    cached = gguf_cache.lookup(gguf_file)
    if cached is not None:
        cfg = checkpoint.read_hf_config(cached)
        with open(os.path.join(cached, gguf_cache.DONE)) as f:
            cfg = cfg.replace(name=json.load(f).get("name", cfg.name))
        module = checkpoint.build_model(cfg, checkpoint.SafetensorsDir(cached), dtype, where=gguf_file)
        if os.path.isfile(os.path.join(cached, "tokenizer.json")):
            return module, functools.partial(HFTokenizer.from_file, cached)
        return module, functools.partial(NoTokenizer, f"{gguf_file}: the GGUF file has no "
                                                      f"tokenizer metadata")
    gf = checkpoint.GGUFFile(gguf_file)
    cfg, tensors = checked_tensors(gf)
    if dequantized_bytes(gf) > int(os.environ.get(gguf_cache.MAX_ENV, 4 << 30)):
        return build_model(cfg, tensors, dtype, where=gguf_file), functools.partial(_gguf_tokenizer, gf)
    arrays = {k: tensors.get(k) for k in tensors.keys()}  # dequantized once, kept for the cache
    module = build_model(cfg, gguf_cache.DictTensors(arrays), dtype, where=gguf_file)
    tok = _gguf_tokenizer(gf)
    gguf_cache.store(gguf_file, cfg, arrays, tok if isinstance(tok, HFTokenizer) else None)
    return module, lambda: tok


def _gguf_tokenizer(gf):
    from fineserve_jax.checkpoint.gguf_tokenizer import gguf_tokenizer, has_gguf_tokenizer

    if not has_gguf_tokenizer(gf):
        return NoTokenizer(f"{gf.path}: the GGUF file has no tokenizer metadata")
    p = gguf_tokenizer(gf)
    return HFTokenizer(p.tokenizer, p.bos_token_id, p.eos_token_id, p.chat_template,
                       p.special_tokens, source=gf.path)


def _resolve_tokenizer(spec: Any, auto, cfg: ModelConfig, where: str):
    """The tokenizer `load_model(tokenizer=spec)` asks for; its ids must fit the model."""
    if isinstance(spec, str) and spec == "auto":
        tok = auto()
    elif isinstance(spec, str) and spec == "byte":
        tok = ByteTokenizer()
    elif isinstance(spec, str) and spec == "none":
        tok = NoTokenizer(f"{where}: loaded with tokenizer='none'")
    elif isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if not os.path.exists(spec):
            raise ValueError(f"tokenizer={spec!r}: not 'auto', 'byte', 'none' nor an existing "
                             f"tokenizer.json or directory holding one")
        tok = HFTokenizer.from_file(spec, cfg.bos_token_id, cfg.eos_token_id)
    elif callable(getattr(spec, "encode", None)) and callable(getattr(spec, "decode", None)):
        tok = spec
    else:
        raise TypeError(f"tokenizer must be 'auto', 'byte', 'none', a path or an object with "
                        f"encode/decode, got {type(spec).__name__}")
    size = getattr(tok, "vocab_size", 0) or 0
    if size > cfg.vocab_size:
        raise TokenizerError(f"{getattr(tok, 'source', '') or where}: the tokenizer has {size} "
                             f"tokens but the model's vocab_size is {cfg.vocab_size}; its ids "
                             f"could not all be embedded")
    return tok
