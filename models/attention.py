"""The attention backend interface and the cache-free causal backend.

The model computes q/k/v (RoPE applied) and hands them to a backend; the backend owns
where K/V live. `CausalAttention` attends within the given tokens only (a full forward
without a cache); the paged backend over the KV arena lives in `fineserve_jax.engine` and
plugs in through the same call, so model code never changes.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> out [B, T, Hq, D] (q's dtype)."""
        ...


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal GQA attention in float32. q [B, T, Hq, D], k/v [B, S, Hkv, D] with S == T."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * (d ** -0.5)
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


class CausalAttention:
    """Backend for a full forward without a cache.

    `kv_roundtrip`, when given, maps k/v `[B, T, Hkv, D]` through the storage a KV cache
    would apply (e.g. quantize + dequantize), so a cache-free forward reproduces exactly
    what a model reading its KV back from the arena computes.
    """

    def __init__(self, kv_roundtrip=None):
        self.kv_roundtrip = kv_roundtrip

    def __call__(self, layer: int, q, k, v):
        if self.kv_roundtrip is not None:
            k, v = self.kv_roundtrip(k), self.kv_roundtrip(v)
        return causal_attention(q, k, v)
