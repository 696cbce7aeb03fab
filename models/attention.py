"""The attention backend interface and the cache-free causal backend.

The model computes q/k/v (RoPE applied) and hands them to a backend together with the KV
cache *value*; the backend returns the attention output and the updated cache. The cache
flows through the decoder's layer scan as part of its carry (in and out of every layer), so
nothing is hidden state of a backend object: a backend holds only static configuration and
the step's read-only inputs. `CausalAttention` attends within the given tokens only (a full
forward without a cache, cache None); the paged backend over the KV arena lives in
`fineserve_jax.engine` and plugs in through the same call, so model code never changes.
"""

from __future__ import annotations

from typing import Any, Protocol, Tuple

import jax
import jax.numpy as jnp

from fineserve_jax.formats.kv_rotation import hadamard_rows


class AttentionBackend(Protocol):
    def __call__(self, cache: Any, layer: jax.Array, q: jax.Array, k: jax.Array,
                 v: jax.Array) -> Tuple[jax.Array, Any]:
        """cache: a pytree (None for none); layer: int32 scalar, traced inside the layer scan;
        q [B, T, Hq, D], k/v [B, T, Hkv, D] -> (out [B, T, Hq, D] in q's dtype, new cache)."""
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
    """Backend for a full forward without a cache (the cache stays None).

    `kv_roundtrip`, when given, maps k/v `[B, T, Hkv, D]` through the storage a KV cache
    would apply (e.g. quantize + dequantize), so a cache-free forward reproduces exactly
    what a model reading its KV back from the arena computes. `rotate_kv`: the cache stores
    Hadamard-rotated rows (`formats.kv_rotation`), so q/k/v are rotated before the round
    trip and the output rotated back, as the paged backend does.
    """

    def __init__(self, kv_roundtrip=None, rotate_kv: bool = False):
        self.kv_roundtrip = kv_roundtrip
        self.rotate_kv = rotate_kv

    def __call__(self, cache, layer, q, k, v):
        if self.rotate_kv:
            q, k, v = hadamard_rows(q), hadamard_rows(k), hadamard_rows(v)
        if self.kv_roundtrip is not None:
            k, v = self.kv_roundtrip(k), self.kv_roundtrip(v)
        out = causal_attention(q, k, v)
        return (hadamard_rows(out) if self.rotate_kv else out), cache
