"""Flax NNX Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5).

Module and parameter names follow Hugging Face (`self_attn.q_proj`, ...). The `num_layers`
decoder layers are ONE `DecoderLayer` with stacked parameters (`[layers, ...]`, see
`models/stacking.py`), and the forward is a `lax.scan` over them with the layer index a
traced int32: the layer body is compiled once, whatever the depth. The checkpoint importer
maps HF's per-layer names (`model.layers.N...`) to index N of the stacked arrays.
Attention goes through an `AttentionBackend`, with the KV cache carried through the scan.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import AttentionBackend, CausalAttention
from models.config import ModelConfig
from models.layer_kernels import LayerKernels, swiglu
from models.layers import RMSNorm, apply_rope, rope_inv_freq, rope_tables
from models.linear import Linear
from models.stacking import (in_place_weights, layer_slice, stack_modules,
                             with_stacked_kernels)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        bias = cfg.attention_bias
        self.q_proj = Linear(d, cfg.num_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope, layer, attention: AttentionBackend, cache):
        """x [B, T, d]; rope = `rope_tables(positions)`; layer int32 scalar -> (y, cache)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        out, cache = attention(cache, layer, q, k, v)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, activation: Optional[Callable] = None):
        """x [B, T, d] -> [B, T, d]; activation(gate, up) replaces `swiglu` when given."""
        return self.down_proj((activation or swiglu)(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, rope, layer, attention, cache, activation: Optional[Callable] = None):
        """One decoder layer: x [B, T, d] -> (x [B, T, d], cache)."""
        h, cache = self.self_attn(self.input_layernorm(x), rope, layer, attention, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), activation), cache


class Transformer(nnx.Module):
    """Decoder-only transformer.

    `__call__(token_ids [B, T] int, positions [B, T] int, attention, cache, logits_indices
    [B, N])` returns (float32 logits [B, N, vocab], the cache after the last layer); N = T
    when `logits_indices` is None. `self.layers` holds every layer's parameters stacked
    `[num_layers, ...]`; `layer(i)` takes one out.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Param(
            (jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
             * 0.02).astype(dtype))
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        self.layers = stack_modules(
            lambda key: DecoderLayer(cfg, dtype, nnx.Rngs(params=key)), (keys,))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, rngs=rngs))
        self.inv_freq = nnx.Variable(
            jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)))

    # -- the pieces of a forward (also used one layer at a time by calibration) --------------
    def embed(self, token_ids: jax.Array) -> jax.Array:
        """token_ids [B, T] int -> hidden states [B, T, d] in the model dtype."""
        return jnp.take(self.embed_tokens[...], token_ids, axis=0).astype(self.dtype)

    def rope(self, positions: jax.Array):
        """RoPE tables of positions [B, T] int (see `models.layers.rope_tables`)."""
        return rope_tables(positions, self.inv_freq[...])

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a module of its own (a copy of its parameter slices)."""
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} out of range for {self.config.num_layers} layers")
        return layer_slice(self.layers, i)

    def head(self, x: jax.Array, logits_indices: Optional[jax.Array] = None) -> jax.Array:
        """x [B, T, d] -> float32 logits [B, N, vocab] of the rows `logits_indices` [B, N]."""
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[..., None], axis=1)
        x = self.norm(x)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", x, self.embed_tokens[...].astype(x.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, token_ids, positions, attention: AttentionBackend, cache: Any = None,
                 logits_indices: Optional[jax.Array] = None,
                 kernels: Optional[LayerKernels] = None):
        """`kernels`: a backend's implementations of the layer body's dense parts (see
        `models.layer_kernels`); None: plain JAX throughout."""
        kernels = kernels or LayerKernels()
        x = self.embed(token_ids)
        rope = self.rope(positions)
        graphdef, stacked = nnx.split(self.layers)
        in_place = in_place_weights(self.layers, kernels.stacked_matmul, kernels.quant_matmul)

        def body(carry, xs):
            x, cache = carry
            params, i = xs
            if in_place:
                params = with_stacked_kernels(params, stacked, in_place, i)
            layer = nnx.merge(graphdef, params)
            return layer(x, rope, i, attention, cache, kernels.swiglu), None

        layer_ids = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, layer_ids))
        return self.head(x, logits_indices), cache

    def full_forward(self, token_ids: jax.Array, kv_roundtrip=None,
                     rotate_kv: bool = False) -> jax.Array:
        """Logits [B, T, vocab] of a full causal forward without a cache (see
        `CausalAttention` for `kv_roundtrip` and `rotate_kv`)."""
        b, t = token_ids.shape
        if t > self.config.max_context:
            raise ValueError(
                f"sequence length {t} exceeds this model's maximum context "
                f"{self.config.max_context}"
                + (f" (sliding window {self.config.sliding_window} is not supported past the "
                   f"window)" if self.config.sliding_window else ""))
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self(token_ids, positions, CausalAttention(kv_roundtrip, rotate_kv))[0]
